"""doconv.parity: the cross-framework parity harness (placeholder until it lands)."""
