"""The report's figures, one module each; the report finds every module in this package (and a
user's, `vanishlab.report.write.find_figures`), so adding a figure is adding a file.

A figure module declares
- `NAME`: its file, `<NAME>.png` in the report directory;
- `CAPTION`: the text under it in report.md, saying how to read it;
- `applies(sweep) -> bool`: whether this sweep's data has what the figure needs (the keys it
  varies, the records' keys), never which preset made it;
- `draw(sweep) -> Figure | None`: the figure (`matplotlib.figure.Figure`), drawn from the
  loaded sweep (`vanishlab.report.load.Sweep`); None where the data it applied to held
  nothing to draw after all (event files without the scalars it plots);
- optionally `ORDER`, where it stands among the figures (lowest first; `LAST` if not given).
"""
