import Foundation
import RelayCore
import Testing
import Worker
import RelayContract

/// ops/k8s: the manifests parse and name the executables, ports, probes,
/// variables and queues the code uses.
@Suite("Kubernetes manifests")
struct KubernetesTests {
    let manifests = ["namespace.yaml", "config.yaml", "rabbitmq-topology-job.yaml", "tokend.yaml", "ingress.yaml", "worker.yaml"]

    func objects() throws -> [[String: Any]] {
        try manifests.flatMap { try yamlDocuments("ops/k8s/\($0)") }
    }

    func object(_ kind: String, _ name: String, in objects: [[String: Any]]) throws -> [String: Any] {
        try #require(objects.first { $0.string("kind") == kind && $0.map("metadata").string("name") == name }, "\(kind) \(name)")
    }

    @Test func kustomizationListsEveryManifest() throws {
        let k = try #require(try yamlDocuments("ops/k8s/kustomization.yaml").first)
        #expect(Set(k.list("resources").compactMap { $0 as? String }) == Set(manifests))
        for file in manifests { #expect(Repo.exists("ops/k8s/\(file)")) }
        // The example Secret stays out, so that applying never overwrites the real one.
        #expect(!k.list("resources").contains { ($0 as? String) == "secret.example.yaml" })
    }

    @Test func deploymentsRunTheExecutablesWithTheContractsPortsProbesAndVariables() throws {
        let all = try objects()
        let config = try object("ConfigMap", "wechatrelay-config", in: all).map("data")
        let secret = try #require(try yamlDocuments("ops/k8s/secret.example.yaml").first).map("stringData")
        let deployments: [String: (portVariable: String, portName: String)] = [
            Contract.ingress: ("HTTP_PORT", "http"), Contract.worker: ("METRICS_PORT", "metrics"), Contract.tokend: ("HTTP_PORT", "http"),
        ]
        for (name, expected) in deployments {
            let deployment = try object("Deployment", name, in: all)
            let pod = deployment.map("spec").map("template").map("spec")
            let container = try #require(pod.list("containers").first as? [String: Any])
            #expect(container.list("command").compactMap { $0 as? String } == [name])
            #expect(container.string("image") == "wechatrelay")
            let env = container.list("env").compactMap { $0 as? [String: Any] }
            try checkEnvironment(Set(env.compactMap { $0.string("name") }), executable: name, in: "ops/k8s \(name)")
            // Every reference resolves to a key of the ConfigMap or the example Secret.
            for variable in env {
                let from = variable.map("valueFrom")
                if let key = from.map("configMapKeyRef").string("key") {
                    #expect(config[key] != nil, "\(name): ConfigMap has no \(key)")
                    #expect(from.map("configMapKeyRef").string("name") == "wechatrelay-config")
                }
                if let key = from.map("secretKeyRef").string("key") {
                    #expect(secret[key] != nil, "\(name): Secret has no \(key)")
                    #expect(from.map("secretKeyRef").string("name") == "wechatrelay-secrets")
                }
            }
            let port = try #require(env.first { $0.string("name") == expected.portVariable }?.int("value"))
            #expect(port == Contract.defaultPorts[name])
            let ports = container.list("ports").compactMap { $0 as? [String: Any] }
            #expect(ports.contains { $0.int("containerPort") == port && $0.string("name") == expected.portName })
            #expect(container.map("livenessProbe").map("httpGet").string("path") == "/healthz")
            #expect(container.map("readinessProbe").map("httpGet").string("path") == "/readyz")
            #expect(container.map("readinessProbe").map("httpGet").string("port") == expected.portName)
            #expect(pod.map("securityContext")["runAsNonRoot"] as? Bool == true)
            // Prometheus scrapes the same port.
            #expect(deployment.map("spec").map("template").map("metadata").map("annotations").int("prometheus.io/port") == port)
            // The selector picks the pod template, and a PodDisruptionBudget covers it.
            let labels = deployment.map("spec").map("template").map("metadata").map("labels")
            let selector = deployment.map("spec").map("selector").map("matchLabels")
            #expect(selector.allSatisfy { labels.string($0.key) == $0.value as? String })
            let pdb = try object("PodDisruptionBudget", name, in: all)
            #expect(pdb.map("spec").map("selector").map("matchLabels").allSatisfy { labels.string($0.key) == $0.value as? String })
        }
        // Services route to the named ports.
        for name in [Contract.ingress, Contract.tokend] {
            let service = try object("Service", name, in: all)
            let port = try #require(service.map("spec").list("ports").first as? [String: Any])
            #expect(port.int("port") == Contract.defaultPorts[name] && port.string("targetPort") == "http")
        }
        // The worker finds tokend through its Service.
        #expect(config.string("TOKEND_URL") == "http://\(Contract.tokend):\(Contract.defaultPorts[Contract.tokend] ?? 0)")
    }

    @Test func autoscalingTargetsTheRightDeploymentsAndQueues() throws {
        let all = try objects()
        let hpa = try object("HorizontalPodAutoscaler", Contract.ingress, in: all)
        #expect(hpa.map("spec").map("scaleTargetRef").string("name") == Contract.ingress)
        #expect((hpa.map("spec").int("minReplicas") ?? 0) >= 2)

        let topology = WeChatTopology()
        let scaled = try object("ScaledObject", Contract.worker, in: all)
        #expect(scaled.map("spec").map("scaleTargetRef").string("name") == Contract.worker)
        // Workers share the shards: more replicas than shard queues would idle.
        #expect(scaled.map("spec").int("maxReplicaCount") == topology.shardCount)
        let trigger = try #require(scaled.map("spec").list("triggers").first as? [String: Any])
        #expect(trigger.string("type") == "rabbitmq")
        let metadata = trigger.map("metadata")
        let pattern = try #require(metadata.string("queueName"))
        #expect(metadata.string("useRegex") == "true" && metadata.string("operation") == "sum")
        let regex = try NSRegularExpression(pattern: pattern)
        func matches(_ queue: String) -> Bool { regex.firstMatch(in: queue, range: NSRange(queue.startIndex..., in: queue)) != nil }
        for n in 0..<topology.shardCount { #expect(matches(topology.shardQueue(n))) }
        let retry = RetryTopology(base: topology)
        for other in [topology.deadLetterQueue, retry.queue(0), "\(topology.prefix).inbound"] { #expect(!matches(other), "\(other)") }
        let auth = try object("TriggerAuthentication", trigger.map("authenticationRef").string("name") ?? "", in: all)
        let ref = try #require(auth.map("spec").list("secretTargetRef").first as? [String: Any])
        let secret = try #require(try yamlDocuments("ops/k8s/secret.example.yaml").first).map("stringData")
        #expect(ref.string("parameter") == "host" && secret[ref.string("key") ?? ""] != nil)
    }

    @Test func theTopologyJobImportsTheDefinitions() throws {
        let job = try object("Job", "wechatrelay-rabbitmq-topology", in: try objects())
        let pod = job.map("spec").map("template").map("spec")
        let container = try #require(pod.list("containers").first as? [String: Any])
        #expect(container.list("args").compactMap { $0 as? String }.joined().contains("/api/definitions"))
        let volume = try #require(pod.list("volumes").first as? [String: Any])
        let items = volume.map("configMap").list("items").compactMap { $0 as? [String: Any] }
        #expect(items.first?.string("key") == "definitions.json")
    }

    /// #18: the example three-node RabbitMQ for the Cluster Operator runs a supported series
    /// and is not in the kustomization (it needs the operator's CRDs); the notes name both URLs.
    @Test func theClusterNotesAndTheRabbitMQClusterExample() throws {
        let cluster = try #require(try yamlDocuments("ops/k8s/cluster/rabbitmq-cluster.yaml").first)
        #expect(cluster.string("kind") == "RabbitmqCluster")
        #expect(cluster.map("spec").int("replicas") == 3)
        #expect(cluster.map("spec").string("image")?.hasPrefix("rabbitmq:4.") == true)
        let k = try #require(try yamlDocuments("ops/k8s/kustomization.yaml").first)
        #expect(!k.list("resources").contains { "\($0)".contains("cluster") })
        let notes = try Repo.read("ops/k8s/cluster.md")
        #expect(notes.contains("redis-sentinel://") && notes.contains("AMQP_URL="))
    }
}
