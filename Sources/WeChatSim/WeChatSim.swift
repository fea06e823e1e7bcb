import ArgumentParser

/// `wechat-sim`: Local stand-in for the WeChat platform: pushes signed messages, serves a fake API, benchmarks.
@main
struct Main: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-sim",
        abstract: "Local stand-in for the WeChat platform: pushes signed messages, serves a fake API, benchmarks.",
        discussion: "Configured from the environment (WECHAT_APPID, WECHAT_TOKEN, WECHAT_AES_KEY, WECHAT_SECRET, HTTP_PORT, …; see docs/CONTRACT.md). Placeholder: a later issue implements it."
    )

    func run() throws {
        throw ValidationError("wechat-sim is not implemented yet")
    }
}
