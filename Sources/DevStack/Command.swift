import Subprocess
import SystemPackage

/// A short command the supervisor runs to completion (the broker script, nginx's
/// configuration, the demo push): standard output captured, standard error appended to a
/// log file, input `/dev/null`. Cancelling the calling task kills it (swift-subprocess's
/// teardown); a command that must not be cut short runs where no stop cancels it
/// (``Supervisor/shielded(_:)``).
struct Command {
    var executable: String
    var arguments: [String]
    var environment: [String: String]
    var directory: String
    /// Where standard error goes (appended).
    var errorLog: String

    struct Failed: Error, CustomStringConvertible {
        let command: String
        let termination: Termination
        let output: String
        var description: String { "\(command) failed (\(termination))" }
    }

    /// Runs the command; returns its standard output, or throws ``Failed`` when it did not exit 0.
    func run() async throws -> String {
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
