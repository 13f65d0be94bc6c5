"""doconv.tf: placeholder until the tf backend lands."""
