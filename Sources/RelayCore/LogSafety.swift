import Foundation
import Synchronization

/// Values from a request (query parameters, headers, reasons that quote them) are
/// attacker-controlled: escaped and shortened before they reach a log line, so that
/// nobody can forge log lines, hide in control characters or flood the log with one value.
public enum LogSafe {
    /// `value` with control, format and non-printing characters as `\u{…}` escapes,
    /// cut to `maxLength` characters (with `…(N more)` when cut).
    public static func escape(_ value: String, maxLength: Int = 128) -> String {
        var out = ""
        var count = 0
        var remaining = 0
        for scalar in value.unicodeScalars {
            if count >= maxLength {
                remaining += 1
                continue
            }
            count += 1
            switch scalar.properties.generalCategory {
            case .control, .format, .lineSeparator, .paragraphSeparator, .surrogate, .privateUse, .unassigned:
                out += "\\u{\(String(scalar.value, radix: 16))}"
            default:
                if scalar == "\\" { out += "\\\\" } else { out.unicodeScalars.append(scalar) }
            }
        }
        if remaining > 0 { out += "…(\(remaining) more)" }
        return out
    }
}

/// A token bucket for log lines: ``admit()`` says whether to log now, and how many
/// lines were suppressed since the last one that was logged (a metric keeps the full count).
public final class LogRateLimiter: Sendable {
    private struct State {
        var tokens: Double
        var last: ContinuousClock.Instant
        var suppressed: Int
    }

    private let burst: Double
    private let perSecond: Double
    private let state: Mutex<State>

    /// - Parameters:
    ///   - burst: lines that may be logged at once.
    ///   - perSecond: lines a second after the burst.
    public init(burst: Int, perSecond: Double) {
        self.burst = Double(max(1, burst))
        self.perSecond = max(0.001, perSecond)
        state = Mutex(State(tokens: Double(max(1, burst)), last: .now, suppressed: 0))
    }

    /// The number of lines suppressed before this one when it may be logged, `nil` when it may not.
    public func admit(now: ContinuousClock.Instant = .now) -> Int? {
        state.withLock { s in
            let elapsed = now - s.last
            s.last = now
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            s.tokens = min(burst, s.tokens + max(0, seconds) * perSecond)
            guard s.tokens >= 1 else {
                s.suppressed += 1
                return nil
            }
            s.tokens -= 1
            defer { s.suppressed = 0 }
            return s.suppressed
        }
    }
}
