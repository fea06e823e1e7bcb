// swift-tools-version:6.0
import PackageDescription

/// The benchmark driver behind `ops/bench` (`relay-bench`), in a package of its own as
/// swift-kafka-client and valkey-swift keep theirs: users of the libraries never build it.
/// It uses the main package's library products.
let package = Package(
    name: "WeChatRelayBenchmarks",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "relay-bench", targets: ["RelayBench"])
    ],
    dependencies: [
        .package(name: "WeChatRelay", path: ".."),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .executableTarget(
            name: "RelayBench",
            dependencies: [
                .product(name: "AMQP", package: "WeChatRelay"),
                .product(name: "Redis", package: "WeChatRelay"),
                .product(name: "RelayContract", package: "WeChatRelay"),
                .product(name: "RelayAMQP", package: "WeChatRelay"),
                .product(name: "WeChat", package: "WeChatRelay"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        )
    ],
    swiftLanguageModes: [.v6]
)
