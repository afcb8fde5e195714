"""The ground floor every other part of jaxtl stands on: errors, where caches and data live, the processes of a
job, atomic publishing, the content-addressed cache, the data-parallel mesh and the preprocessing spec. Nothing
here imports any other part of jaxtl."""
