extension Duration {
    /// The duration in seconds, as a floating-point number.
    public var secondsValue: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }

    /// The duration in whole nanoseconds (for swift-metrics timers).
    public var wholeNanoseconds: Int64 {
        let (s, attos) = components
        return s * 1_000_000_000 + attos / 1_000_000_000
    }
}
