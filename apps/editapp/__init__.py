"""The Streamlit app's pieces: settings (config), shared state (service), one module per view."""
