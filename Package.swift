// swift-tools-version:6.0
import PackageDescription

/// WeChatRelay: a scale-out backend for WeChat Official Accounts.
///
/// Layout: C system-library shims (`CRabbitMQ`, `CHiredis`), Swift client
/// modules over them (`AMQP`, `Redis`), the contract (`RelayContract`, `RelayAMQP`), one
/// library per service and one thin executable target per binary named in docs/CONTRACT.md.
/// The benchmark driver is a package of its own under `Benchmarks/`.
let package = Package(
    name: "WeChatRelay",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "wechat-ingress", targets: ["WeChatIngress"]),
        .executable(name: "wechat-worker", targets: ["WeChatWorker"]),
        .executable(name: "wechat-tokend", targets: ["WeChatTokend"]),
        .executable(name: "wechat-sim", targets: ["WeChatSim"]),
        .executable(name: "relay-fuzz", targets: ["RelayFuzz"]),
        .executable(name: "wechat-dev", targets: ["WeChatDev"]),
        .library(name: "AMQP", targets: ["AMQP"]),
        .library(name: "WeChat", targets: ["WeChat"]),
        .library(name: "Redis", targets: ["Redis"]),
        .library(name: "RelayContract", targets: ["RelayContract"]),
        .library(name: "RelayAMQP", targets: ["RelayAMQP"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-configuration", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
        .package(url: "https://github.com/swiftlang/swift-subprocess", from: "1.0.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        .systemLibrary(
            name: "CRabbitMQ",
            pkgConfig: "librabbitmq",
            providers: [.apt(["librabbitmq-dev"])]
        ),
        // hiredis' pkg-config file adds -D_FILE_OFFSET_BITS=64, which SwiftPM refuses
        // with a warning on every build; the shim includes <hiredis/hiredis.h> from the
        // default include path instead and the module map links libhiredis.
        .systemLibrary(
            name: "CHiredis",
            providers: [.apt(["libhiredis-dev"])]
        ),
        .target(
            name: "AMQP",
            dependencies: [
                "CRabbitMQ",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "Redis",
            dependencies: [
                "CHiredis",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // The inter-service contract: queue and exchange names, shard routing, envelope
        // headers, Redis keys. Pure Swift, no dependencies: every service and test uses it.
        .target(name: "RelayContract"),
        // The contract's RabbitMQ declarations (`WeChatTopology.inbound`), for the services that use RabbitMQ.
        .target(name: "RelayAMQP", dependencies: ["AMQP", "RelayContract", .product(name: "Logging", package: "swift-log")]),
        .target(
            name: "WeChat",
            dependencies: [
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "RelayCore",
            dependencies: [
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "Configuration", package: "swift-configuration"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        .target(
            name: "Ingress",
            dependencies: [
                "AMQP", "WeChat", "RelayCore", "RelayContract", "RelayAMQP",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .executableTarget(
            name: "WeChatIngress",
            dependencies: [
                "AMQP", "Ingress", "RelayCore", "RelayContract", "RelayAMQP",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "Worker",
            dependencies: [
                "AMQP", "Redis", "RelayCore", "RelayContract", "RelayAMQP", "TokenClient", "WeChat",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        .executableTarget(
            name: "WeChatWorker",
            dependencies: [
                "Worker", "AMQP", "Redis", "RelayCore", "RelayContract", "RelayAMQP", "TokenClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "TokenClient",
            dependencies: [
                "Redis", "RelayContract",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
            ]
        ),
        .target(
            name: "Tokend",
            dependencies: [
                "Redis", "RelayCore", "RelayContract", "TokenClient", "WeChat",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "WeChatTokend",
            dependencies: [
                "Tokend", "Redis", "RelayCore", "RelayContract",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "Simulator",
            dependencies: [
                "WeChat",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "WeChatSim",
            dependencies: [
                "Simulator", "RelayCore", "WeChat", "Chaos",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        // Fuzz targets (ops/fuzz builds them with libFuzzer; the normal build replays Fuzz/corpus).
        // The local stack's supervisor (`ops/dev`): starts, watches and stops the processes.
        .target(
            name: "DevStack",
            dependencies: [
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(name: "WeChatDev", dependencies: ["DevStack"]),
        // `wechat-sim chaos`: the whole stack under faults, checked from the fake API's log.
        .target(
            name: "Chaos",
            dependencies: [
                "DevStack", "Simulator", "WeChat",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "RelayFuzz",
            dependencies: ["WeChat", .product(name: "HummingbirdCore", package: "hummingbird")],
            path: "Fuzz/RelayFuzz"
        ),
        .testTarget(
            name: "AMQPTests",
            dependencies: [
                "AMQP",
                "TestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "RedisTests",
            dependencies: [
                "Redis", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "IngressTests",
            dependencies: [
                "Ingress", "AMQP", "WeChat", "RelayCore", "RelayContract", "RelayAMQP", "TestSupport", "Simulator",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
            ]
        ),
        .testTarget(
            name: "SimulatorTests",
            dependencies: [
                "Simulator", "WeChat",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
            ]
        ),
        .testTarget(
            name: "TokendTests",
            dependencies: [
                "Tokend", "TokenClient", "Redis", "RelayCore", "RelayContract", "Simulator", "WeChat", "TestSupport",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "WorkerTests",
            dependencies: [
                "Worker", "Tokend", "TokenClient", "AMQP", "Redis", "RelayCore", "RelayContract", "RelayAMQP", "Simulator", "WeChat",
                "TestSupport", "Ingress",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "OpsTests",
            dependencies: [
                "AMQP", "Redis", "RelayCore", "RelayContract", "RelayAMQP", "Worker", "TestSupport", "DevStack",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        .testTarget(
            name: "WeChatTests",
            dependencies: [
                "WeChat", "TestSupport",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
