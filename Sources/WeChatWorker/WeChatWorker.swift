import ArgumentParser

/// `wechat-worker`: Consumes, deduplicates, keeps sessions, decides and sends replies.
@main
struct Main: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-worker",
        abstract: "Consumes, deduplicates, keeps sessions, decides and sends replies.",
        discussion: "Configured from the environment (WECHAT_APPID, AMQP_URL, REDIS_URL, WECHAT_API_URL, WORKER_RULES, …; see docs/CONTRACT.md). Placeholder: a later issue implements it."
    )

    func run() throws {
        throw ValidationError("wechat-worker is not implemented yet")
    }
}
