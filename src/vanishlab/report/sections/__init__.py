"""The report's sections before its figures, one module each, found like the figures (every
module in this package).

A section module declares
- `applies(sweep) -> bool`: whether this sweep has what the section shows;
- `write(sweep, out) -> str`: writes the section's files into the report directory `out` and
  returns its markdown;
- optionally `ORDER`, where it stands (lowest first).
"""
