################################################################################
#
# socket-firmware
#
################################################################################

# The firmware is the repository this tree is part of, built from its working copy.
# The version is pyproject.toml's (the tree's CI test compares them).
SOCKET_FIRMWARE_VERSION = 0.1.0
SOCKET_FIRMWARE_SITE = $(BR2_EXTERNAL_SDWAN_PATH)/..
SOCKET_FIRMWARE_SITE_METHOD = local
SOCKET_FIRMWARE_SETUP_TYPE = setuptools
# setup.py's cffi_modules (the fast path, the DTLS binding) run on the host's cffi and
# compile with the target's compiler against the target's OpenSSL.
SOCKET_FIRMWARE_DEPENDENCIES = host-python-cffi openssl
# pyproject.toml's build requirements are Buildroot's host packages here.
SOCKET_FIRMWARE_BUILD_OPTS = --skip-dependency-check
# Only the sources are copied: no development builds (a host .so), images or venv.
SOCKET_FIRMWARE_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude /.venv --exclude /build --exclude /buildroot --exclude /bench \
	--exclude /tests --exclude /native/out --exclude '*.so' --exclude __pycache__ \
	--exclude .pytest_cache --exclude .ruff_cache --exclude '*.egg-info'

$(eval $(python-package))
