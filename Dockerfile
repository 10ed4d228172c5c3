# The demo service, built in a Rust image and run from a slim one.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p exporter --example demo

FROM debian:bookworm-slim
COPY --from=build /src/target/release/examples/demo /usr/local/bin/demo
EXPOSE 9464
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/demo"]
CMD ["--listen", "0.0.0.0:9464"]
