// The device, OS and versions for results.json, and the process's memory:
// resident size, physical footprint (what iOS's per-app memory limit counts)
// and their peaks.

import Foundation
import MLX

#if canImport(Darwin)
    import Darwin
#elseif canImport(Glibc)
    import Glibc
#endif
#if canImport(Metal)
    import Metal
#endif

#if canImport(Darwin)
    private let systemUname = Darwin.uname
#elseif canImport(Glibc)
    private let systemUname = Glibc.uname
#endif

/// The versions Package.swift pins (SwiftPM exposes no package versions at run time).
public enum PinnedVersions {
    public static let mlxSwift = "0.31.6"
    public static let mlxSwiftLM = "3.31.4"
}

public enum ProcessMemory {
    /// Current resident set size in bytes.
    public static func residentBytes() -> Int? {
        #if canImport(Darwin)
            var info = mach_task_basic_info()
            var count = mach_msg_type_number_t(
                MemoryLayout<mach_task_basic_info>.size / MemoryLayout<natural_t>.size)
            let kr = withUnsafeMutablePointer(to: &info) {
                $0.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
                    task_info(mach_task_self_, task_flavor_t(MACH_TASK_BASIC_INFO), $0, &count)
                }
            }
            return kr == KERN_SUCCESS ? Int(info.resident_size) : nil
        #else
            // Linux: resident pages, the second field of /proc/self/statm (as harness.py).
            guard let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8)
            else { return nil }
            let fields = statm.split(separator: " ")
            guard fields.count > 1, let pages = Int(fields[1]) else { return nil }
            return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
        #endif
    }

    /// (current, peak) physical footprint in bytes; nil where there is no such
    /// figure (Linux).
    public static func footprint() -> (current: Int, peak: Int)? {
        #if canImport(Darwin)
            var info = task_vm_info_data_t()
            var count = mach_msg_type_number_t(
                MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<natural_t>.size)
            let kr = withUnsafeMutablePointer(to: &info) {
                $0.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
                    task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), $0, &count)
                }
            }
            guard kr == KERN_SUCCESS else { return nil }
            return (Int(info.phys_footprint), Int(info.ledger_phys_footprint_peak))
        #else
            return nil
        #endif
    }

    /// Peak resident size of the process so far (getrusage: bytes on Darwin,
    /// KiB on Linux, as harness.py's peak_rss_bytes).
    public static func peakResidentBytes() -> Int {
        var usage = rusage()
        #if canImport(Darwin)
            getrusage(RUSAGE_SELF, &usage)
            return Int(usage.ru_maxrss)
        #else
            getrusage(Int32(RUSAGE_SELF.rawValue), &usage)  // Glibc imports it as an enum
            return Int(usage.ru_maxrss) * 1024
        #endif
    }
}

public enum Machine {
    static func sysctlString(_ name: String) -> String? {
        #if canImport(Darwin)
            var size = 0
            guard sysctlbyname(name, nil, &size, nil, 0) == 0, size > 0 else { return nil }
            var buffer = [CChar](repeating: 0, count: size)
            guard sysctlbyname(name, &buffer, &size, nil, 0) == 0 else { return nil }
            return String(cString: buffer)
        #else
            return nil
        #endif
    }

    /// uname(2)'s fields: (sysname, release, machine).
    static func uname() -> (system: String, release: String, machine: String) {
        var u = utsname()
        _ = withUnsafeMutablePointer(to: &u) { systemUname($0) }
        func field<T>(_ value: T) -> String {
            withUnsafeBytes(of: value) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
        }
        return (field(u.sysname), field(u.release), field(u.machine))
    }

    /// The CPU's name: sysctl's brand string on a Mac, /proc/cpuinfo's
    /// "model name" on Linux (as harness.py); nil on an iPhone.
    public static func cpuName() -> String? {
        if let brand = sysctlString("machdep.cpu.brand_string") { return brand }
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else {
            return nil
        }
        for line in info.split(separator: "\n") where line.hasPrefix("model name") {
            if let colon = line.firstIndex(of: ":") {
                return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
        }
        return nil
    }

    /// The GPU's name as Metal reports it ("Apple M2 Pro", "Apple A18 Pro GPU"):
    /// what mx.device_info()["device_name"] gives Python; nil without Metal.
    public static func gpuName() -> String? {
        #if canImport(Metal)
            return MTLCreateSystemDefaultDevice()?.name
        #else
            return nil
        #endif
    }

    /// "iPhone17,1" on an iPhone, "Mac15,8" on a Mac, uname's machine elsewhere.
    public static func deviceModel() -> String {
        #if os(iOS)
            return sysctlString("hw.machine") ?? "unknown"
        #elseif canImport(Darwin)
            return sysctlString("hw.model") ?? "unknown"
        #else
            return uname().machine
        #endif
    }

    public static func osDescription() -> String {
        #if canImport(Darwin)
            let v = ProcessInfo.processInfo.operatingSystemVersion
            #if os(iOS)
                let name = "iOS"
            #else
                let name = "macOS"
            #endif
            return "\(name) \(v.majorVersion).\(v.minorVersion).\(v.patchVersion)"
        #else
            let u = uname()
            return "\(u.system) \(u.release)"  // as Python's platform.system() + release()
        #endif
    }

    /// `machine.chip` as harness.py's machine_info writes it: the GPU's device
    /// name when Metal runs the model, else the CPU's name, else the machine.
    public static func chip(metal: Bool) -> String {
        (metal ? gpuName() : nil) ?? cpuName() ?? uname().machine
    }

    public static func info() -> MachineInfo {
        let metal = Device.defaultDevice().deviceType == .gpu && gpuName() != nil
        let device = Device.defaultDevice()
        return MachineInfo(
            chip: chip(metal: metal), cpu: cpuName(),
            machine: sysctlString("hw.machine") ?? uname().machine,
            os: osDescription(), memoryBytes: Int(ProcessInfo.processInfo.physicalMemory),
            cpuCount: ProcessInfo.processInfo.processorCount,
            mlx: "\(PinnedVersions.mlxSwift) (mlx-swift)",
            mlxLm: "\(PinnedVersions.mlxSwiftLM) (mlx-swift-lm)",
            backend: metal ? "Metal" : "CPU",
            defaultDevice: "Device(\(device.deviceType == .gpu ? "gpu" : "cpu"), 0)",
            deviceModel: deviceModel())
    }

    public static func runtime() -> RuntimeInfo {
        #if DEBUG
            let build = "debug"
        #else
            let build = "release"
        #endif
        return RuntimeInfo(
            name: "mlx-swift", mlxSwift: PinnedVersions.mlxSwift,
            mlxSwiftLm: PinnedVersions.mlxSwiftLM, buildConfiguration: build,
            cacheLimitBytes: Memory.cacheLimit, memoryLimitBytes: Memory.memoryLimit)
    }
}
