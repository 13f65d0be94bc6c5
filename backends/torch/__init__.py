"""doconv.torch: placeholder until the torch backend lands."""
