// The iOS benchmark app: one screen (ContentView). Build it as an Xcode iOS app
// target (named MobileMoEBenchiOS, not MobileMoEBench: see ../README.md) that
// links the MobileMoEBench library of ../Package.swift; see
// ../README.md ("iPhone") for the steps, the Info.plist and the entitlement.

import SwiftUI

@main
struct MobileMoEBenchApp: App {
    var body: some Scene {
        WindowGroup {
            ContentView()
        }
    }
}
