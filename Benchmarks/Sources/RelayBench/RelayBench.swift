import ArgumentParser

/// `relay-bench`: the Swift side of `ops/bench`. Each subcommand runs one
/// workload and prints one number (operations per second) on stdout, so the
/// script can put it next to the C baseline measured in the same run.
@main
struct RelayBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "relay-bench",
        abstract: "Benchmarks for WeChatRelay's modules (driven by ops/bench).",
        subcommands: [AMQPPublishBench.self, AMQPConsumeBench.self, ProtocolBench.self, RedisBench.self, SignPush.self, AMQPPurge.self, WorkerPreload.self]
    )
}
