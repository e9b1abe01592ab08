"""vanishlab's Hydra configs, installed as the package `vanishlab.conf` (see pyproject.toml).

A regular package, not a namespace one: setuptools' editable finder cannot find a namespace
package mapped outside its parent's directory, and this file makes `vanishlab.conf` findable
the same way in an editable install and a wheel. Hydra skips it when it lists the configs.
"""
