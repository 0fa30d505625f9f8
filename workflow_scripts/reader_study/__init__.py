"""The expert reader study: a blinded page radiologists open in a browser (build), and the scores of
their answers (score). docs/reader-study.md says how to run one."""
