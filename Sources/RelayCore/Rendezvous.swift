import Synchronization

/// Meeting points keyed by id, where a value handed over (``put(_:for:)``) meets a task that
/// waits for it (``wait(_:for:)``) at most a bounded time. The lock decides every race between
/// the value and the deadline: a value is accepted only while its slot is open, and a slot the
/// deadline closed accepts nothing more. Either side may come first.
///
/// The passive-reply handshake uses it twice: the ingress waits for a worker's offer, the
/// worker for the ingress's verdict.
public final class Rendezvous<Value: Sendable>: Sendable {
    private struct Slot {
        var value: Value?
        var waiter: CheckedContinuation<Value?, Never>?
    }

    private let slots = Mutex<[String: Slot]>([:])

    public init() {}

    /// Opens a slot for `id`: from now on a value for it is accepted.
    public func open(_ id: String) {
        slots.withLock { $0[id] = Slot() }
    }

    /// Waits up to `bound` for the value of `id` (one accepted before the wait is returned at
    /// once). `nil` when the deadline came first, or the waiting task was cancelled; the slot
    /// is then closed.
    public func wait(_ id: String, for bound: Duration) async -> Value? {
        let timer = Task {
            try? await Task.sleep(for: bound)
            self.expire(id)
        }
        defer { timer.cancel() }
        return await withTaskCancellationHandler {
            await waitForValue(id)
        } onCancel: {
            self.expire(id)
        }
    }

    private func waitForValue(_ id: String) async -> Value? {
        await withCheckedContinuation { (c: CheckedContinuation<Value?, Never>) in
            let now: Value?? = slots.withLock { s in
                guard var slot = s[id] else { return .some(nil) }  // closed by the deadline already
                if let value = slot.value {
                    s[id] = nil
                    return .some(value)
                }
                slot.waiter = c
                s[id] = slot
                return .none
            }
            if let now { c.resume(returning: now) }
        }
    }

    /// The deadline: closes the slot unless it holds a value (which the wait will then return).
    private func expire(_ id: String) {
        let waiter = slots.withLock { s -> CheckedContinuation<Value?, Never>? in
            guard let slot = s[id], slot.value == nil else { return nil }
            s[id] = nil
            return slot.waiter
        }
        waiter?.resume(returning: nil)
    }

    /// Hands `value` to the slot of `id`; false if the slot is closed (or already has a value).
    @discardableResult
    public func put(_ value: Value, for id: String) -> Bool {
        let outcome = slots.withLock { s -> (accepted: Bool, waiter: CheckedContinuation<Value?, Never>?) in
            guard var slot = s[id], slot.value == nil else { return (false, nil) }
            if let waiter = slot.waiter {
                s[id] = nil
                return (true, waiter)
            }
            slot.value = value
            s[id] = slot
            return (true, nil)
        }
        outcome.waiter?.resume(returning: value)
        return outcome.accepted
    }

    /// Closes the slot of `id` without waiting; returns a value it had accepted.
    public func close(_ id: String) -> Value? {
        slots.withLock { $0.removeValue(forKey: id)?.value }
    }
}
