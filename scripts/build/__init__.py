"""Building the deployment package: what ships, the wheels it carries, the tarball itself."""
