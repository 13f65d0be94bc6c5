"""doconv.mxnet: placeholder until the mxnet backend lands."""
