"""triagebot: intake and triage for an IoT connectivity operator's support desk."""

__version__ = "0.1.0"
