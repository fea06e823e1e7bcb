import Synchronization

/// A counting semaphore for async tasks.
final class Limiter: Sendable {
    private let state: Mutex<(free: Int, waiters: [CheckedContinuation<Void, Never>])>

    init(permits: Int) { state = Mutex((permits, [])) }

    func acquire() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let go = state.withLock { s -> Bool in
                if s.free > 0 {
                    s.free -= 1
                    return true
                }
                s.waiters.append(c)
                return false
            }
            if go { c.resume() }
        }
    }

    func release() {
        let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if s.waiters.isEmpty {
                s.free += 1
                return nil
            }
            return s.waiters.removeFirst()
        }
        next?.resume()
    }
}

/// Per-key chains of work: each job for a key starts after the previous one for that key.
///
/// Appending checks a stop flag under the same lock as the append, so once
/// ``stopAppending(_:)`` returned no job is added behind ``waitForAll()``'s back.
final class Chains: Sendable {
    private struct State {
        var tails: [String: (id: Int, task: Task<Void, Never>)] = [:]
        /// Jobs appended and not finished, per key.
        var pending: [String: Int] = [:]
        var nextID = 0
        var stopped = false
        var waiters: [(key: String, below: Int, continuation: CheckedContinuation<Void, Never>)] = []
    }

    private let state = Mutex(State())

    /// Appends `job` to `key`'s chain unless `stop` is set; returns whether it did.
    @discardableResult
    func append(_ key: String, unless stop: Flag? = nil, _ job: @escaping @Sendable () async -> Void) -> Bool {
        state.withLock { s in
            if s.stopped || stop?.isSet == true { return false }
            s.nextID += 1
            let id = s.nextID
            let previous = s.tails[key]?.task
            let task = Task {
                await previous?.value
                await job()
                self.finished(key, id)
            }
            s.tails[key] = (id, task)
            s.pending[key, default: 0] += 1
            return true
        }
    }

    /// Sets `flag` and refuses every later append; wakes anyone waiting in ``waitUntilFewer(than:for:)``.
    func stopAppending(_ flag: Flag) {
        let waiters = state.withLock { s in
            flag.set()
            s.stopped = true
            defer { s.waiters.removeAll() }
            return s.waiters.map(\.continuation)
        }
        for w in waiters { w.resume() }
    }

    /// Returns once fewer than `limit` jobs of `key` are pending (or appending was stopped).
    func waitUntilFewer(than limit: Int, for key: String) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let go = state.withLock { s -> Bool in
                if s.stopped || s.pending[key, default: 0] < limit { return true }
                s.waiters.append((key, limit, c))
                return false
            }
            if go { c.resume() }
        }
    }

    private func finished(_ key: String, _ id: Int) {
        let ready = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            if s.tails[key]?.id == id { s.tails[key] = nil }
            let left = s.pending[key, default: 1] - 1
            s.pending[key] = left > 0 ? left : nil
            var ready: [CheckedContinuation<Void, Never>] = []
            s.waiters.removeAll { w in
                guard w.key == key, left < w.below else { return false }
                ready.append(w.continuation)
                return true
            }
            return ready
        }
        for c in ready { c.resume() }
    }

    func waitForAll() async {
        while let next = state.withLock({ $0.tails.values.first?.task }) { await next.value }
    }
}

/// A one-way flag shared with a task.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
    func clear() { value.store(false, ordering: .releasing) }
}

/// A value shared between tasks behind a lock.
final class Shared<Value: Sendable>: Sendable {
    private let value: Mutex<Value>
    init(_ initial: Value) { value = Mutex(initial) }
    func get() -> Value { value.withLock { $0 } }
    func set(_ new: Value) { value.withLock { $0 = new } }
}
