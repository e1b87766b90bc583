"""The box around socketd: the serial console, status LEDs, the hardware watchdog and the
addressing of the WAN ports. Nothing here is needed to run a site in the lab."""
