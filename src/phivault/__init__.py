"""phivault: a data service for protected health information.

The folder list is the architecture (see DESIGN.md): ``ledger`` (the tamper-evident audit
ledger), ``crypto`` (keys and element encryption), ``identity`` (who is asking), ``access``
(what they may see), ``records`` (FHIR resources), ``api`` (the ASGI app), ``privacy``
(scrubbing and de-identification), ``ops`` (backups, evidence), ``cli`` (the command).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
