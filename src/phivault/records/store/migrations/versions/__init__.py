"""One file per schema change of the records tables; never edit a released one."""
