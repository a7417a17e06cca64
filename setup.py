"""Build hook: everything declarative lives in pyproject.toml; this file only adds native extensions."""
from setuptools import setup

setup()
