"""Foundations every layer uses: config and profiles, errors, artefacts (fingerprinted folders), asset resolution, CPU numerics."""
