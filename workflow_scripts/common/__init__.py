"""What every concern shares: the error wrapper (errors.run_stage), config and its schema, the
results/ paths, the split tables and label formats, image reading, devices, failpoints, report cells."""
