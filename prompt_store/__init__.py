"""Task prompts on disk and on their way to the device.

format.py (native artifact), peft_io.py (PEFT in/out), validate.py (checks on the way in), archive.py (safe upload
extraction), tiers.py (disk -> host -> device LRU caches), store.py (the versioned multi-tenant PromptStore's API;
its in-memory index and replica refresh in index.py, access rules in access.py, on-disk protocol in disk.py,
uploads in importing.py, records in records.py), errors.py (one error class per HTTP status). Imports only
prompt_core.
"""
