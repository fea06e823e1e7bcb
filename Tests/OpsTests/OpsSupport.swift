import Foundation
import TestSupport
import Testing
import Yams

/// Files of the repository, found from this source file's path.
enum Repo {
    static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func path(_ relative: String) -> String { root.appendingPathComponent(relative).path }

    static func read(_ relative: String) throws -> String { try String(contentsOfFile: path(relative), encoding: .utf8) }

    static func exists(_ relative: String) -> Bool { FileManager.default.fileExists(atPath: path(relative)) }

    /// A fresh temporary directory, removed by the caller.
    static func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("wr-ops-\(UInt64.random(in: 0 ... .max))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }
}

/// docs/CONTRACT.md's configuration table and default ports, written down once
/// for the checks of the deployment files.
enum Contract {
    static let ingress = "wechat-ingress", worker = "wechat-worker", tokend = "wechat-tokend", sim = "wechat-sim"
    static let executables: Set<String> = [ingress, worker, tokend, sim]

    /// variable → the executables that read it.
    static let variables: [String: Set<String>] = [
        "WECHAT_APPID": executables,
        "WECHAT_TOKEN": [ingress, sim],
        "WECHAT_AES_KEY": [ingress, sim],
        "WECHAT_ACCOUNT_ID": [ingress],
        "WECHAT_PREVIOUS_TOKEN": [ingress],
        "WECHAT_PREVIOUS_AES_KEY": [ingress],
        "WECHAT_SECRET": [tokend, sim],
        "WECHAT_API_URL": [worker, tokend],
        "AMQP_URL": [ingress, worker],
        "REDIS_URL": [worker, tokend],
        "HTTP_HOST": [ingress, tokend, sim],
        "HTTP_PORT": [ingress, tokend, sim],
        "TOKEND_URL": [worker],
        "TOKEND_SECRET": [tokend, worker],
        "WORKER_RULES": [worker],
        "WORKER_CONCURRENCY": [worker],
        "METRICS_PORT": [worker],
        "LOG_LEVEL": executables,
        "INGRESS_TIMESTAMP_WINDOW": [ingress],
        "INGRESS_MAX_BODY": [ingress],
        "INGRESS_CONFIRM_TIMEOUT": [ingress],
    ]

    /// Where each executable listens by default (the worker: METRICS_PORT).
    static let defaultPorts = [ingress: 8080, tokend: 8081, sim: 8090, worker: 9100]

    /// What each executable cannot start without.
    static let required: [String: Set<String>] = [
        ingress: ["WECHAT_APPID", "WECHAT_TOKEN"],
        worker: ["WECHAT_APPID"],
        tokend: ["WECHAT_APPID", "WECHAT_SECRET", "TOKEND_SECRET"],
        sim: ["WECHAT_APPID", "WECHAT_SECRET"],
    ]

    static func variables(for executable: String) -> Set<String> {
        Set(variables.filter { $0.value.contains(executable) }.keys)
    }
}

/// The environment variables each executable's code reads: the variable-name
/// string literals in the sources of its modules.
enum CodeVariables {
    static let modules = [
        Contract.ingress: ["Ingress", "WeChatIngress", "RelayCore"],
        Contract.worker: ["Worker", "WeChatWorker", "TokenClient", "RelayCore"],
        Contract.tokend: ["Tokend", "WeChatTokend", "RelayCore"],
        Contract.sim: ["Simulator", "WeChatSim", "RelayCore"],
    ]

    static func read(by executable: String) throws -> Set<String> {
        try Repo.captures(
            of: #""((?:WECHAT|AMQP|REDIS|HTTP|TOKEND|WORKER|METRICS|LOG|INGRESS)_[A-Z_]+)""#, inModules: modules[executable] ?? [])
    }
}

extension Repo {
    /// The first capture group of every match of `pattern` in the Swift sources of `modules`.
    static func captures(of pattern: String, inModules modules: [String]) throws -> Set<String> {
        let re = try NSRegularExpression(pattern: pattern)
        var found: Set<String> = []
        for module in modules {
            let dir = path("Sources/\(module)")
            for file in try FileManager.default.contentsOfDirectory(atPath: dir) where file.hasSuffix(".swift") {
                let text = try String(contentsOfFile: "\(dir)/\(file)", encoding: .utf8)
                for m in re.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                    if let r = Range(m.range(at: 1), in: text) { found.insert(String(text[r])) }
                }
            }
        }
        return found
    }
}

/// Checks a deployment file's environment for one executable: every variable
/// is one the contract gives that executable and its code reads, and the
/// required ones are there.
func checkEnvironment(_ names: Set<String>, executable: String, in place: String) throws {
    let contract = Contract.variables(for: executable)
    let code = try CodeVariables.read(by: executable)
    #expect(names.subtracting(contract).isEmpty, "\(place): not \(executable)'s variables in the contract: \(names.subtracting(contract).sorted())")
    #expect(names.subtracting(code).isEmpty, "\(place): \(executable) never reads \(names.subtracting(code).sorted())")
    let missing = (Contract.required[executable] ?? []).subtracting(names)
    #expect(missing.isEmpty, "\(place): \(executable) needs \(missing.sorted())")
}

/// YAML helpers over Yams' untyped values.
extension Dictionary where Key == String, Value == Any {
    func map(_ key: String) -> [String: Any] { self[key] as? [String: Any] ?? [:] }
    func list(_ key: String) -> [Any] { self[key] as? [Any] ?? [] }
    func string(_ key: String) -> String? {
        switch self[key] {
        case let s as String: return s
        case let i as Int: return String(i)
        case let b as Bool: return String(b)
        default: return nil
        }
    }
    func int(_ key: String) -> Int? { self[key] as? Int ?? string(key).flatMap { Int($0) } }
}

/// Every YAML document in a file, as dictionaries.
func yamlDocuments(_ relative: String) throws -> [[String: Any]] {
    try Yams.load_all(yaml: Repo.read(relative)).compactMap { $0 as? [String: Any] }
}

/// RabbitMQ's own metrics that the alerts and the dashboard use (rabbitmq_prometheus
/// with per-object metrics, ops/rabbitmq/rabbitmq.conf); a test scrapes a broker
/// configured that way and finds each of them per queue.
let rabbitMQQueueMetrics: Set<String> = [
    "rabbitmq_queue_messages", "rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked", "rabbitmq_queue_consumers",
]

/// Metric names referenced in a PromQL expression.
func metricNames(in expression: String) -> Set<String> {
    let re = try? NSRegularExpression(pattern: #"\b((?:wechat|tokend|amqp|rabbitmq)_[a-z_]+)\b"#)
    var names: Set<String> = []
    for m in re?.matches(in: expression, range: NSRange(expression.startIndex..., in: expression)) ?? [] {
        if let r = Range(m.range(at: 1), in: expression) { names.insert(String(expression[r])) }
    }
    return names
}

/// True when `tool` is installed (ops/deps --test installs them); under CI a
/// missing tool fails the test instead of skipping it.
func toolAvailable(_ path: String) -> Bool {
    FileManager.default.isExecutableFile(atPath: path) || TestServices.isCI
}
