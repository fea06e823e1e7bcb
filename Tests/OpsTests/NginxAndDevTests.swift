import Foundation
import TestSupport
import Testing

/// ops/nginx: `nginx -t` accepts the production configuration (80 and 443),
/// and its limits agree with the ingress's.
@Suite("nginx", .enabled(if: toolAvailable("/usr/sbin/nginx")))
struct NginxTests {
    @Test func theProductionConfigurationPassesNginxTest() async throws {
        let dir = try Repo.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let certs = dir.appendingPathComponent("certs")
        try FileManager.default.createDirectory(at: certs, withIntermediateDirectories: true)
        // A throwaway self-signed certificate where the TLS server expects one.
        try await runCommand(
            "/usr/bin/openssl",
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=wechat.test",
             "-keyout", certs.appendingPathComponent("privkey.pem").path, "-out", certs.appendingPathComponent("fullchain.pem").path],
            includeStandardError: true)
        // Container paths become local ones; `ingress` (docker-compose's DNS name) becomes loopback.
        func localize(_ text: String) -> String {
            text.replacingOccurrences(of: "/etc/nginx/", with: dir.path + "/")
                .replacingOccurrences(of: "server ingress:8080", with: "server 127.0.0.1:8080")
                .replacingOccurrences(of: "pid /tmp/nginx.pid", with: "pid \(dir.path)/nginx.pid")
        }
        for file in ["nginx.conf", "wechat-locations.conf"] {
            try localize(try Repo.read("ops/nginx/\(file)")).write(to: dir.appendingPathComponent(file), atomically: true, encoding: .utf8)
        }
        try localize(try Repo.read("ops/nginx/tls.conf")).write(to: dir.appendingPathComponent("tls.conf"), atomically: true, encoding: .utf8)
        let output = try await runCommand(
            "/usr/sbin/nginx", ["-t", "-p", dir.path, "-e", dir.appendingPathComponent("error.log").path, "-c", dir.appendingPathComponent("nginx.conf").path],
            includeStandardError: true)
        #expect(output.contains("syntax is ok") && output.contains("test is successful"), "\(output)")
    }

    @Test func limitsAgreeWithTheIngress() throws {
        let locations = try Repo.read("ops/nginx/wechat-locations.conf")
        // INGRESS_MAX_BODY's default, 65536 bytes.
        #expect(locations.contains("client_max_body_size 64k;"))
        // Longer than INGRESS_CONFIRM_TIMEOUT (4 s), shorter than WeChat's 5 s.
        #expect(locations.contains("proxy_read_timeout 4500ms;"))
        #expect(locations.contains("proxy_set_header X-Real-IP $remote_addr;"))
        #expect(locations.contains("proxy_pass http://wechat_ingress;"))
        let main = try Repo.read("ops/nginx/nginx.conf")
        #expect(main.contains("listen 80 ") && main.contains("server ingress:\(Contract.defaultPorts[Contract.ingress] ?? 0)"))
        #expect(try Repo.read("ops/nginx/tls.conf").contains("listen 443 ssl"))
    }
}
