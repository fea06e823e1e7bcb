import DevStack
import Foundation

// `wechat-dev`: the local stack's supervisor, run by `ops/dev` (see DevStack).
let own = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent().path
exit(await DevStack.run(environment: ProcessInfo.processInfo.environment, ownDirectory: own))
