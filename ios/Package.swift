// swift-tools-version: 6.1
// MobileMoE for Apple devices: the model (MobileMoE + the dense MobileLLM-Pro
// baseline) registered with mlx-swift-lm, the benchmark library, and the
// benchmark command. The iOS app's sources live in App/, outside every target
// here (an Xcode app target builds them, see README.md), so `swift build`
// also works where SwiftUI does not (Linux, CPU: see README.md).
//
// mlx-swift 0.31.6 declares swift-tools-version 6.3, so building this package
// needs a Swift 6.3 toolchain even though this manifest asks for 6.1.

import PackageDescription

let package = Package(
    name: "MobileMoE",
    platforms: [.macOS(.v14), .iOS(.v17)],
    products: [
        .library(name: "MobileMoE", targets: ["MobileMoE"]),
        .library(name: "MobileMoEBench", targets: ["MobileMoEBench"]),
        .executable(name: "mobilemoe-bench", targets: ["mobilemoe-bench"]),
    ],
    dependencies: [
        // The newest releases whose sources the code was checked against.
        .package(url: "https://github.com/ml-explore/mlx-swift", exact: "0.31.6"),
        .package(url: "https://github.com/ml-explore/mlx-swift-lm", exact: "3.31.4"),
    ],
    targets: [
        .target(
            name: "MobileMoE",
            dependencies: [
                .product(name: "MLX", package: "mlx-swift"),
                .product(name: "MLXNN", package: "mlx-swift"),
                .product(name: "MLXLMCommon", package: "mlx-swift-lm"),
                .product(name: "MLXLLM", package: "mlx-swift-lm"),
            ],
            path: "Sources/MobileMoE"
        ),
        .target(
            name: "MobileMoEBench",
            dependencies: [
                "MobileMoE",
                .product(name: "MLX", package: "mlx-swift"),
                .product(name: "MLXLMCommon", package: "mlx-swift-lm"),
            ],
            path: "Sources/MobileMoEBench"
        ),
        .executableTarget(
            name: "mobilemoe-bench",
            dependencies: ["MobileMoEBench"],
            path: "Sources/mobilemoe-bench"
        ),
        .testTarget(
            name: "MobileMoETests",
            dependencies: [
                "MobileMoE",
                .product(name: "MLX", package: "mlx-swift"),
                .product(name: "MLXNN", package: "mlx-swift"),
                .product(name: "MLXLMCommon", package: "mlx-swift-lm"),
            ],
            path: "Tests/MobileMoETests"
        ),
    ],
    swiftLanguageModes: [.v5]
)
