"""Applications: the command line, the upload-and-search demo, the notebook pipeline, the report and its figures."""
