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

/// A one-way event: set once, awaited by any number of tasks (cancellably).
final class Event: Sendable {
    private let state = Mutex<(set: Bool, waiters: [Int: CheckedContinuation<Bool, Never>], next: Int)>((false, [:], 0))

    var isSet: Bool { state.withLock { $0.set } }

    func set() {
        let waiters = state.withLock { s -> [CheckedContinuation<Bool, Never>] in
            s.set = true
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for w in waiters { w.resume(returning: true) }
    }

    /// True once set; false if the calling task is cancelled first.
    @discardableResult
    func wait() async -> Bool {
        let id = state.withLock { s -> Int in
            defer { s.next += 1 }
            return s.next
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
                let now = state.withLock { s -> Bool? in
                    if s.set { return true }
                    if Task.isCancelled { return false }
                    s.waiters[id] = c
                    return nil
                }
                if let now { c.resume(returning: now) }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(returning: false)
        }
    }

    /// True once set; false if `bound` passes (or the task is cancelled) first.
    func wait(upTo bound: Duration) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask { await self.wait() }
            group.addTask {
                try? await Task.sleep(for: bound)
                return false
            }
            defer { group.cancelAll() }
            return await group.next() ?? false
        }
    }
}

/// The order of each user's jobs in one shard: a job starts after the previous job of the
/// same user has finished. The jobs themselves are tasks of the shard's task group; this
/// only hands out their turns.
///
/// Taking a turn checks a stop flag under the same lock, so once ``stop(_:)`` returned no
/// turn is handed out behind ``waitForAll(upTo:)``'s back.
final class UserTurns: Sendable {
    /// One job's place in its user's line.
    struct Turn: Sendable {
        fileprivate let previous: Event?
        fileprivate let done: Event
        fileprivate let key: String

        /// Returns once the previous job of this user has finished (false if cancelled first).
        func waitForPrevious() async -> Bool { await previous?.wait() ?? true }
    }

    private struct State {
        var tails: [String: Event] = [:]
        var pending: [String: Int] = [:]
        var stopped = false
        var limitWaiters: [(key: String, below: Int, continuation: CheckedContinuation<Void, Never>)] = []
    }

    private let state = Mutex(State())

    /// The next turn of `key`, unless taking turns was stopped or `stop` is set.
    func take(_ key: String, unless stop: Flag? = nil) -> Turn? {
        state.withLock { s in
            if s.stopped || stop?.isSet == true { return nil }
            let done = Event()
            let turn = Turn(previous: s.tails[key], done: done, key: key)
            s.tails[key] = done
            s.pending[key, default: 0] += 1
            return turn
        }
    }

    /// The job of `turn` has finished: the next one of its user may start.
    func finish(_ turn: Turn) {
        turn.done.set()
        let ready = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            if s.tails[turn.key] === turn.done { s.tails[turn.key] = nil }
            let left = s.pending[turn.key, default: 1] - 1
            s.pending[turn.key] = left > 0 ? left : nil
            var ready: [CheckedContinuation<Void, Never>] = []
            s.limitWaiters.removeAll { w in
                guard w.key == turn.key, left < w.below else { return false }
                ready.append(w.continuation)
                return true
            }
            return ready
        }
        for c in ready { c.resume() }
    }

    /// Sets `flag` and hands out no more turns; wakes anyone waiting in ``waitUntilFewer(than:for:)``.
    func stop(_ flag: Flag) {
        let waiters = state.withLock { s in
            flag.set()
            s.stopped = true
            defer { s.limitWaiters.removeAll() }
            return s.limitWaiters.map(\.continuation)
        }
        for w in waiters { w.resume() }
    }

    /// Returns once fewer than `limit` jobs of `key` are pending (or turns were stopped).
    func waitUntilFewer(than limit: Int, for key: String) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let go = state.withLock { s -> Bool in
                if s.stopped || s.pending[key, default: 0] < limit { return true }
                s.limitWaiters.append((key, limit, c))
                return false
            }
            if go { c.resume() }
        }
    }

    /// Returns true once every job has finished, false if `bound` passed first. (Polls every
    /// 20 ms: it runs once per hand-over.)
    func waitForAll(upTo bound: Duration) async -> Bool {
        let deadline = ContinuousClock.now + bound
        while !state.withLock({ $0.pending.isEmpty }) {
            if ContinuousClock.now >= deadline || Task.isCancelled { return false }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return true
    }
}

/// A one-way flag shared with a task.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
    func clear() { value.store(false, ordering: .releasing) }
}

