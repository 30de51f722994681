FROM python:3.11-slim
WORKDIR /srv/segue
COPY . .
RUN pip install --no-cache-dir -e '.[demo]'
ENV HF_HUB_OFFLINE=1
CMD ["segue", "worker"]
