"""What `snakemake --report` shows: the HTML pages (report_pages) and the training curves (curves)."""
