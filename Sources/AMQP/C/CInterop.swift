import CRabbitMQ

/// Scratch C memory for one outgoing AMQP method: strings, bodies and field
/// tables are copied in, handed to librabbitmq (which encodes them at once),
/// and freed together when the arena is reset.
///
/// - Important: Used only on a connection's own thread.
final class CArena {
    private var blocks: [UnsafeMutableRawPointer] = []

    deinit { reset() }

    /// Frees everything allocated since the last reset.
    func reset() {
        for b in blocks { b.deallocate() }
        blocks.removeAll(keepingCapacity: true)
    }

    private func allocate(_ size: Int, alignment: Int = 16) -> UnsafeMutableRawPointer {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(size, 1), alignment: alignment)
        blocks.append(p)
        return p
    }

    func bytes<C: Collection>(_ data: C) -> amqp_bytes_t where C.Element == UInt8 {
        let count = data.count
        let p = allocate(count + 1)
        let typed = p.bindMemory(to: UInt8.self, capacity: count + 1)
        _ = UnsafeMutableBufferPointer(start: typed, count: count).initialize(from: data)
        typed[count] = 0
        return amqp_bytes_t(len: count, bytes: p)
    }

    func bytes(_ s: String) -> amqp_bytes_t { bytes(s.utf8) }

    /// A NUL-terminated copy, for librabbitmq's `const char *` parameters.
    func cString(_ s: String) -> UnsafePointer<CChar> {
        let b = bytes(s)
        return UnsafePointer(b.bytes.assumingMemoryBound(to: CChar.self))
    }

    func table(_ t: AMQPTable) -> amqp_table_t {
        if t.isEmpty { return amqp_empty_table }
        let entries = allocate(MemoryLayout<amqp_table_entry_t>.stride * t.count)
            .bindMemory(to: amqp_table_entry_t.self, capacity: t.count)
        // Sorted keys: deterministic encoding, which makes re-declarations byte-identical.
        for (i, key) in t.keys.sorted().enumerated() {
            // `t[key]` exists: the key came from `t.keys`.
            entries[i] = amqp_table_entry_t(key: bytes(key), value: field(t[key] ?? .void))
        }
        return amqp_table_t(num_entries: Int32(t.count), entries: entries)
    }

    func field(_ v: AMQPFieldValue) -> amqp_field_value_t {
        var f = amqp_field_value_t()
        switch v {
        case .string(let s):
            f.kind = UInt8(ascii: "S"); f.value.bytes = bytes(s)
        case .bytes(let b):
            f.kind = UInt8(ascii: "x"); f.value.bytes = bytes(b)
        case .int(let i):
            f.kind = UInt8(ascii: "l"); f.value.i64 = i
        case .bool(let b):
            f.kind = UInt8(ascii: "t"); f.value.boolean = b ? 1 : 0
        case .double(let d):
            f.kind = UInt8(ascii: "d"); f.value.f64 = d
        case .timestamp(let t):
            f.kind = UInt8(ascii: "T"); f.value.u64 = t
        case .table(let t):
            f.kind = UInt8(ascii: "F"); f.value.table = table(t)
        case .array(let a):
            f.kind = UInt8(ascii: "A")
            let items = allocate(MemoryLayout<amqp_field_value_t>.stride * max(a.count, 1))
                .bindMemory(to: amqp_field_value_t.self, capacity: max(a.count, 1))
            for (i, item) in a.enumerated() { items[i] = field(item) }
            f.value.array = amqp_array_t(num_entries: Int32(a.count), entries: items)
        case .void:
            f.kind = UInt8(ascii: "V")
        }
        return f
    }

    /// Fills librabbitmq's property struct from ours.
    func properties(_ p: AMQPProperties) -> amqp_basic_properties_t {
        var out = amqp_basic_properties_t()
        var flags: UInt32 = 0
        if let v = p.contentType { out.content_type = bytes(v); flags |= BasicFlag.contentType }
        if let v = p.contentEncoding { out.content_encoding = bytes(v); flags |= BasicFlag.contentEncoding }
        if !p.headers.isEmpty { out.headers = table(p.headers); flags |= BasicFlag.headers }
        out.delivery_mode = p.persistent ? 2 : 1; flags |= BasicFlag.deliveryMode
        if let v = p.priority { out.priority = v; flags |= BasicFlag.priority }
        if let v = p.correlationID { out.correlation_id = bytes(v); flags |= BasicFlag.correlationID }
        if let v = p.replyTo { out.reply_to = bytes(v); flags |= BasicFlag.replyTo }
        if let v = p.expiration { out.expiration = bytes(v); flags |= BasicFlag.expiration }
        if let v = p.messageID { out.message_id = bytes(v); flags |= BasicFlag.messageID }
        if let v = p.timestamp { out.timestamp = v; flags |= BasicFlag.timestamp }
        if let v = p.type { out.type = bytes(v); flags |= BasicFlag.type }
        if let v = p.userID { out.user_id = bytes(v); flags |= BasicFlag.userID }
        if let v = p.appID { out.app_id = bytes(v); flags |= BasicFlag.appID }
        out._flags = flags
        return out
    }
}

/// `AMQP_BASIC_*_FLAG` from amqp_framing.h.
enum BasicFlag {
    static let contentType: UInt32 = 1 << 15
    static let contentEncoding: UInt32 = 1 << 14
    static let headers: UInt32 = 1 << 13
    static let deliveryMode: UInt32 = 1 << 12
    static let priority: UInt32 = 1 << 11
    static let correlationID: UInt32 = 1 << 10
    static let replyTo: UInt32 = 1 << 9
    static let expiration: UInt32 = 1 << 8
    static let messageID: UInt32 = 1 << 7
    static let timestamp: UInt32 = 1 << 6
    static let type: UInt32 = 1 << 5
    static let userID: UInt32 = 1 << 4
    static let appID: UInt32 = 1 << 3
}

// MARK: - Decoding what librabbitmq hands us (copies out; no C memory escapes)

extension amqp_bytes_t {
    var array: [UInt8] {
        guard len > 0, let bytes else { return [] }
        return Array(UnsafeRawBufferPointer(start: bytes, count: len))
    }

    var string: String {
        guard len > 0, let bytes else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: bytes, count: len), as: UTF8.self)
    }
}

enum CDecode {
    static func table(_ t: amqp_table_t) -> AMQPTable {
        var out: AMQPTable = [:]
        guard t.num_entries > 0, let entries = t.entries else { return out }
        for i in 0..<Int(t.num_entries) {
            out[entries[i].key.string] = field(entries[i].value)
        }
        return out
    }

    static func field(_ f: amqp_field_value_t) -> AMQPFieldValue {
        switch f.kind {
        case UInt8(ascii: "t"): return .bool(f.value.boolean != 0)
        case UInt8(ascii: "b"): return .int(Int64(f.value.i8))
        case UInt8(ascii: "B"): return .int(Int64(f.value.u8))
        case UInt8(ascii: "s"): return .int(Int64(f.value.i16))
        case UInt8(ascii: "u"): return .int(Int64(f.value.u16))
        case UInt8(ascii: "I"): return .int(Int64(f.value.i32))
        case UInt8(ascii: "i"): return .int(Int64(f.value.u32))
        case UInt8(ascii: "l"): return .int(f.value.i64)
        case UInt8(ascii: "L"): return .int(Int64(clamping: f.value.u64))
        case UInt8(ascii: "f"): return .double(Double(f.value.f32))
        case UInt8(ascii: "d"): return .double(f.value.f64)
        case UInt8(ascii: "T"): return .timestamp(f.value.u64)
        case UInt8(ascii: "S"): return .string(f.value.bytes.string)
        case UInt8(ascii: "x"): return .bytes(f.value.bytes.array)
        case UInt8(ascii: "F"): return .table(table(f.value.table))
        case UInt8(ascii: "A"):
            var items: [AMQPFieldValue] = []
            if f.value.array.num_entries > 0, let e = f.value.array.entries {
                for i in 0..<Int(f.value.array.num_entries) { items.append(field(e[i])) }
            }
            return .array(items)
        case UInt8(ascii: "D"):
            var v = Double(f.value.decimal.value)
            for _ in 0..<f.value.decimal.decimals { v /= 10 }
            return .double(v)
        default: return .void
        }
    }

    static func properties(_ p: amqp_basic_properties_t) -> AMQPProperties {
        let f = p._flags
        func has(_ flag: UInt32) -> Bool { f & flag != 0 }
        return AMQPProperties(
            contentType: has(BasicFlag.contentType) ? p.content_type.string : nil,
            contentEncoding: has(BasicFlag.contentEncoding) ? p.content_encoding.string : nil,
            headers: has(BasicFlag.headers) ? table(p.headers) : [:],
            persistent: has(BasicFlag.deliveryMode) && p.delivery_mode == 2,
            priority: has(BasicFlag.priority) ? p.priority : nil,
            correlationID: has(BasicFlag.correlationID) ? p.correlation_id.string : nil,
            replyTo: has(BasicFlag.replyTo) ? p.reply_to.string : nil,
            expiration: has(BasicFlag.expiration) ? p.expiration.string : nil,
            messageID: has(BasicFlag.messageID) ? p.message_id.string : nil,
            timestamp: has(BasicFlag.timestamp) ? p.timestamp : nil,
            type: has(BasicFlag.type) ? p.type.string : nil,
            userID: has(BasicFlag.userID) ? p.user_id.string : nil,
            appID: has(BasicFlag.appID) ? p.app_id.string : nil
        )
    }
}
