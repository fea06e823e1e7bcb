import ArgumentParser

/// `wechat-tokend`: Central access_token / jsapi_ticket keeper with an HTTP API.
@main
struct Main: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-tokend",
        abstract: "Central access_token / jsapi_ticket keeper with an HTTP API.",
        discussion: "Configured from the environment (WECHAT_APPID, WECHAT_SECRET, REDIS_URL, TOKEND_SECRET, HTTP_PORT, …; see docs/CONTRACT.md). Placeholder: a later issue implements it."
    )

    func run() throws {
        throw ValidationError("wechat-tokend is not implemented yet")
    }
}
