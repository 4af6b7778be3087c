"""Working next to a PACS: the DICOMweb client (QIDO-RS, WADO-RS, STOW-RS) the `pacs` command builds on."""
