import ArgumentParser

/// `wechat-ingress`: HTTP endpoint that WeChat's servers call; verifies and enqueues to RabbitMQ.
@main
struct Main: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wechat-ingress",
        abstract: "HTTP endpoint that WeChat's servers call; verifies and enqueues to RabbitMQ.",
        discussion: "Configured from the environment (WECHAT_APPID, WECHAT_TOKEN, WECHAT_AES_KEY, AMQP_URL, HTTP_PORT, …; see docs/CONTRACT.md). Placeholder: a later issue implements it."
    )

    func run() throws {
        throw ValidationError("wechat-ingress is not implemented yet")
    }
}
