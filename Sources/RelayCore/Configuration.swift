import Configuration
import Foundation
import SystemPackage

/// A configuration problem, reported as one line that names the variable (docs/CONTRACT.md).
public struct ConfigurationError: Error, Sendable, CustomStringConvertible {
    public let variable: String
    public let reason: String

    public init(variable: String, reason: String) {
        self.variable = variable
        self.reason = reason
    }

    public var description: String { "\(variable): \(reason)" }
}

/// Reads the executables' settings: environment variables first, then a `.env`
/// file in the working directory (the environment wins), through swift-configuration.
///
/// Variables are named as in docs/CONTRACT.md (`WECHAT_APPID`); errors name them.
public struct RelayEnvironment: Sendable {
    private let reader: ConfigReader

    /// Loads the environment and, when present, `./.env`.
    public static func load(environment: [String: String] = ProcessInfo.processInfo.environment) async throws
        -> RelayEnvironment
    {
        var providers: [any ConfigProvider] = [EnvironmentVariablesProvider(environmentVariables: environment)]
        do {
            providers.append(try await EnvironmentVariablesProvider(environmentFilePath: ".env", allowMissing: true))
        } catch {
            throw ConfigurationError(variable: ".env", reason: "cannot read the .env file: \(error)")
        }
        return RelayEnvironment(reader: ConfigReader(providers: providers))
    }

    /// Uses exactly these values (for tests).
    public init(_ values: [String: String]) {
        reader = ConfigReader(provider: EnvironmentVariablesProvider(environmentVariables: values))
    }

    private init(reader: ConfigReader) { self.reader = reader }

    /// `WECHAT_APPID` ↔ swift-configuration's key `wechat.appid`.
    private static func key(_ variable: String) -> ConfigKey {
        ConfigKey(variable.lowercased().split(separator: "_").map(String.init))
    }

    /// The value, or `nil` when unset or empty.
    public func string(_ variable: String, isSecret: Bool = false) -> String? {
        guard let v = reader.string(forKey: Self.key(variable), isSecret: isSecret), !v.isEmpty else { return nil }
        return v
    }

    public func required(_ variable: String, isSecret: Bool = false) throws -> String {
        guard let v = string(variable, isSecret: isSecret) else {
            throw ConfigurationError(variable: variable, reason: "is required but not set")
        }
        return v
    }

    public func int(_ variable: String, default value: Int, range: ClosedRange<Int> = 0...Int.max) throws -> Int {
        guard let text = string(variable) else { return value }
        guard let n = Int(text.trimmingCharacters(in: .whitespaces)), range.contains(n) else {
            throw ConfigurationError(
                variable: variable, reason: "must be a whole number in \(range.lowerBound)...\(range.upperBound), got '\(text)'")
        }
        return n
    }

    /// A TCP port (1–65535).
    public func port(_ variable: String, default value: Int) throws -> Int {
        try int(variable, default: value, range: 1...65535)
    }
}
