// Whether the phone may train now (charging, on an unmetered network, enough battery): the app
// measures it (UIDevice.batteryState, NWPathMonitor, ...) behind `EligibilityProvider`; the agent
// reports it as DeviceCapabilities on Register and every GetTask, and asks for work only while
// the app's `EligibilityRule` holds.
import Foundation

/// The device's current conditions, asked before every Register and GetTask.
public protocol EligibilityProvider: Sendable {
    func capabilities() async -> DeviceCapabilities
}

/// Conditions that never change: a simulator, a test, or a device plugged in on Wi-Fi.
public struct FixedEligibility: EligibilityProvider {
    public let value: DeviceCapabilities

    public init(_ value: DeviceCapabilities) { self.value = value }

    public init(charging: Bool = true, unmeteredNetwork: Bool = true, batteryLevel: Float = 1) {
        value = DeviceCapabilities(
            charging: charging, unmeteredNetwork: unmeteredNetwork, batteryLevel: batteryLevel)
    }

    public func capabilities() async -> DeviceCapabilities { value }
}

/// When the agent may ask for work. The defaults are the usual rule for on-device training:
/// only while charging on an unmetered network.
public struct EligibilityRule: Sendable, Equatable {
    public var requireCharging: Bool
    public var requireUnmeteredNetwork: Bool
    /// 0...1; a device with an unknown (negative) level passes only if this is 0.
    public var minimumBattery: Float

    public init(
        requireCharging: Bool = true, requireUnmeteredNetwork: Bool = true,
        minimumBattery: Float = 0
    ) {
        self.requireCharging = requireCharging
        self.requireUnmeteredNetwork = requireUnmeteredNetwork
        self.minimumBattery = minimumBattery
    }

    /// No condition: always ask for work (the coordinator still sees the capabilities).
    public static let always = EligibilityRule(
        requireCharging: false, requireUnmeteredNetwork: false, minimumBattery: 0)

    /// Nil when `capabilities` allow work, else why not ("not charging").
    public func refusal(_ capabilities: DeviceCapabilities) -> String? {
        if requireCharging && !capabilities.charging { return "not charging" }
        if requireUnmeteredNetwork && !capabilities.unmeteredNetwork {
            return "not on an unmetered network"
        }
        if minimumBattery > 0 && capabilities.batteryLevel < minimumBattery {
            return capabilities.batteryLevel < 0
                ? "battery level unknown" : "battery at \(capabilities.batteryLevel)"
        }
        return nil
    }
}
