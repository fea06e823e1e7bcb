import Subprocess
import SystemPackage

/// A short command the supervisor runs to completion (the broker script, nginx's
/// configuration, the demo push): standard output captured, standard error appended to a
/// log file, input `/dev/null`. Cancelling the calling task kills it (swift-subprocess's
/// teardown); a command that must not be cut short runs where no stop cancels it
/// (``ProcessHost/shielded(_:)``).
package struct Command {
    package var executable: String
    package var arguments: [String]
    package var environment: [String: String]
    package var directory: String
    /// Where standard error goes (appended).
    package var errorLog: String

    package init(executable: String, arguments: [String], environment: [String: String], directory: String, errorLog: String) {
        self.executable = executable
        self.arguments = arguments
        self.environment = environment
        self.directory = directory
        self.errorLog = errorLog
    }

    package struct Failed: Error, CustomStringConvertible {
        package let command: String
        package let termination: Termination
        package let output: String
        package var description: String { "\(command) failed (\(termination))" }
    }

    /// Runs the command; returns its standard output, or throws ``Failed`` when it did not exit 0.
    package func run() async throws -> String {
        let errors = try FileDescriptor.open(errorLog, .writeOnly, options: [.append, .create], permissions: [.ownerReadWrite, .groupRead, .otherRead])
        let result = try await Subprocess.run(
            .path(FilePath(executable)), arguments: Arguments(arguments),
            environment: .custom(Dictionary(uniqueKeysWithValues: environment.map { (Environment.Key(stringLiteral: $0.key), $0.value) })),
            workingDirectory: FilePath(directory),
            input: .none, output: .string(limit: 1 << 20), error: .fileDescriptor(errors, closeAfterSpawningProcess: true))
        let text = result.standardOutput
        let termination = Termination(result.terminationStatus)
        guard termination == .exited(0) else {
            throw Failed(command: ([executable] + arguments).joined(separator: " "), termination: termination, output: text)
        }
        return text
    }
}

/// The broker addresses `ops/services start` prints (`export AMQP_URL=…` and `export REDIS_URL=…`
/// lines), or `nil` when either is missing.
package func brokerURLs(fromServicesOutput output: String) -> (amqp: String, redis: String)? {
    var values: [String: String] = [:]
    for line in output.split(separator: "\n") where line.hasPrefix("export ") {
        let pair = line.dropFirst("export ".count)
        guard let eq = pair.firstIndex(of: "=") else { continue }
        values[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
    }
    guard let amqp = values["AMQP_URL"], let redis = values["REDIS_URL"] else { return nil }
    return (amqp, redis)
}
