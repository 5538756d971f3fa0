"""usage-agent: billing-grade infrastructure usage scraper."""

__version__ = "0.1.0"
