// The device, OS and versions for results.json, and the process's memory:
// resident size, physical footprint (what iOS's per-app memory limit counts)
// and their peaks.

import Foundation
import MLX

#if canImport(Darwin)
    import Darwin
#endif

/// The versions Package.swift pins (SwiftPM exposes no package versions at run time).
public enum PinnedVersions {
    public static let mlxSwift = "0.31.6"
    public static let mlxSwiftLM = "3.31.4"
}

public enum ProcessMemory {
    /// Current resident set size in bytes.
    public static func residentBytes() -> Int? {
        var info = mach_task_basic_info()
        var count = mach_msg_type_number_t(
            MemoryLayout<mach_task_basic_info>.size / MemoryLayout<natural_t>.size)
        let kr = withUnsafeMutablePointer(to: &info) {
            $0.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
                task_info(mach_task_self_, task_flavor_t(MACH_TASK_BASIC_INFO), $0, &count)
            }
        }
        return kr == KERN_SUCCESS ? Int(info.resident_size) : nil
    }

    /// (current, peak) physical footprint in bytes.
    public static func footprint() -> (current: Int, peak: Int)? {
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
    }

    /// Peak resident size of the process so far (getrusage; bytes on Darwin).
    public static func peakResidentBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF, &usage)
        return Int(usage.ru_maxrss)
    }
}

public enum Machine {
    static func sysctlString(_ name: String) -> String? {
        var size = 0
        guard sysctlbyname(name, nil, &size, nil, 0) == 0, size > 0 else { return nil }
        var buffer = [CChar](repeating: 0, count: size)
        guard sysctlbyname(name, &buffer, &size, nil, 0) == 0 else { return nil }
        return String(cString: buffer)
    }

    /// "iPhone17,1" on an iPhone, "Mac15,8" on a Mac.
    public static func deviceModel() -> String {
        #if os(iOS)
            return sysctlString("hw.machine") ?? "unknown"
        #else
            return sysctlString("hw.model") ?? "unknown"
        #endif
    }

    public static func osDescription() -> String {
        let v = ProcessInfo.processInfo.operatingSystemVersion
        #if os(iOS)
            let name = "iOS"
        #else
            let name = "macOS"
        #endif
        return "\(name) \(v.majorVersion).\(v.minorVersion).\(v.patchVersion)"
    }

    public static func info() -> MachineInfo {
        let gpu = GPU.deviceInfo()
        let cpu = sysctlString("machdep.cpu.brand_string")
        return MachineInfo(
            chip: gpu.architecture, cpu: cpu, machine: sysctlString("hw.machine") ?? "arm64",
            os: osDescription(), memoryBytes: Int(ProcessInfo.processInfo.physicalMemory),
            cpuCount: ProcessInfo.processInfo.processorCount,
            mlx: "\(PinnedVersions.mlxSwift) (mlx-swift)",
            mlxLm: "\(PinnedVersions.mlxSwiftLM) (mlx-swift-lm)",
            backend: Device.defaultDevice().deviceType == .gpu ? "Metal" : "CPU",
            defaultDevice: Device.defaultDevice().description, deviceModel: deviceModel())
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
