"""The lake format: storage, schemas, data files and their commit and read rules, the write path,
journals, maintenance and checks (docs/lake-spec.md). Nothing here imports the rest of nirslake."""
