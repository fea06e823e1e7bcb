import Foundation
import TestSupport
import Testing

/// ops/docker/Dockerfile, without a Docker engine: the image is built the way
/// the file says, and its runtime stage installs every system library the
/// executables load (the Swift runtime itself is linked statically).
@Suite("Dockerfile")
struct DockerfileTests {
    func dockerfile() throws -> String { try Repo.read("ops/docker/Dockerfile") }

    /// The packages the runtime stage installs.
    func runtimePackages() throws -> Set<String> {
        let text = try dockerfile()
        let runtime = try #require(text.range(of: "AS runtime"), "a stage named runtime")
        let install = try #require(text[runtime.upperBound...].range(of: "apt-get install -y --no-install-recommends "))
        let line = text[install.upperBound...].prefix { $0 != "\\" && $0 != "\n" }
        return Set(line.split(separator: " ").map(String.init))
    }

    @Test func buildsEveryExecutableStaticallyIntoASlimNonRootImage() throws {
        let text = try dockerfile()
        #expect(text.contains("swift build -c release --static-swift-stdlib"))
        #expect(text.contains("FROM debian:bookworm-slim AS runtime"))
        #expect(text.contains("USER 10001:10001"))
        let copied = try #require(text.range(of: "for exe in ")).upperBound
        let names = Set(text[copied...].prefix { $0 != ";" }.split(separator: " ").map(String.init))
        #expect(names == Contract.executables)
        let packages = try runtimePackages()
        #expect(packages.isSuperset(of: ["librabbitmq4", "libhiredis0.14", "ca-certificates"]))
        #expect(!packages.contains { $0.hasSuffix("-dev") }, "the runtime stage needs no development package: \(packages)")
        // The image the Kubernetes manifests run as that user.
        #expect(try Repo.read("ops/k8s/ingress.yaml").contains("runAsUser: 10001"))
    }

    /// Every shared library an executable loads, other than the Swift runtime,
    /// comes from a package the runtime stage installs, one of their
    /// dependencies, or Debian's base (libc6, libgcc-s1, zlib1g).
    @Test(.enabled(if: TestServices.environment["WR_BIN_DIR"] != nil || TestServices.isCI))
    func theRuntimeStageProvidesEverySharedLibrary() async throws {
        let bin = try #require(TestServices.environment["WR_BIN_DIR"], "ops/test exports WR_BIN_DIR")
        let runtime = try runtimePackages()
        var allowed: Set<String> = runtime.union(["libc6", "libgcc-s1", "zlib1g"])
        for package in runtime.sorted() where package.hasPrefix("lib") {
            let depends = try await runCommand("/usr/bin/dpkg-query", ["-W", "-f=${Depends}", package])
            for dependency in depends.split(separator: ",") {
                if let name = dependency.split(separator: " ").first { allowed.insert(String(name)) }
            }
        }
        for executable in Contract.executables.sorted() {
            let ldd = try await runCommand("/usr/bin/ldd", ["\(bin)/\(executable)"])
            let libraries = ldd.split(separator: "\n").compactMap { line -> String? in
                guard let arrow = line.range(of: "=> ") else { return nil }
                let path = line[arrow.upperBound...].prefix { $0 != " " }
                return path.hasPrefix("/") ? String(path) : nil
            }
            if executable == Contract.worker {  // the one that uses both C libraries
                #expect(libraries.contains { $0.contains("librabbitmq") } && libraries.contains { $0.contains("libhiredis") })
            }
            for library in libraries where !library.contains("/swift/") {
                let package = try await owningPackage(library)
                #expect(allowed.contains(package), "\(executable) loads \(library) from \(package), which the runtime image lacks")
            }
        }
    }

    /// The Debian package that installed `library`; with merged /usr, dpkg knows
    /// some files under /lib and others under /usr/lib, while ldd reports /lib.
    func owningPackage(_ library: String) async throws -> String {
        var candidates = [library]
        if library.hasPrefix("/lib/") { candidates.append("/usr" + library) }
        for path in candidates {
            if let owner = try? await runCommand("/usr/bin/dpkg", ["-S", path]) { return String(owner.prefix { $0 != ":" }) }
        }
        return "(no package owns \(library))"
    }
}
