package bench;

import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.ParallelConsumerOptions.ProcessingOrder;
import io.confluent.parallelconsumer.ParallelStreamProcessor;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.stream.Collectors;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * The baseline bench/throughput.py compares the connector with: Confluent Parallel Consumer,
 * UNORDERED, concurrency 256; each event POSTed to the Threads API simulator with
 * java.net.http, one result record produced per event. Exits once the group has committed the
 * input topic's end offsets (those at start: the topic is pre-produced).
 *
 * <p>Usage: java -jar pc-bench.jar BOOTSTRAP INPUT_TOPIC RESULTS_TOPIC GROUP BASE_URL [CONCURRENCY]
 */
public final class PcBench {
  private PcBench() {}

  public static void main(String[] args) throws Exception {
    String bootstrap = args[0];
    String input = args[1];
    String results = args[2];
    String group = args[3];
    String baseUrl = args[4];
    int concurrency = args.length > 5 ? Integer.parseInt(args[5]) : 256;
    URI uri = URI.create(baseUrl + "/api/v1/appuid/demo-app/threads");

    Properties c = new Properties();
    c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    c.put(ConsumerConfig.GROUP_ID_CONFIG, group);
    c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false); // Parallel Consumer commits
    c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
    c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
    Properties p = new Properties();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    p.put(ProducerConfig.ACKS_CONFIG, "all");
    p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class);

    HttpClient http =
        HttpClient.newBuilder()
            .version(HttpClient.Version.HTTP_1_1)
            .connectTimeout(Duration.ofSeconds(5))
            .build();
    ParallelConsumerOptions<String, String> options =
        ParallelConsumerOptions.<String, String>builder()
            .ordering(ProcessingOrder.UNORDERED)
            .maxConcurrency(concurrency)
            .consumer(new KafkaConsumer<>(c))
            .producer(new KafkaProducer<>(p))
            .build();
    ParallelStreamProcessor<String, String> processor =
        ParallelStreamProcessor.createEosStreamProcessor(options);
    processor.subscribe(List.of(input));
    processor.pollAndProduce(
        context -> {
          ConsumerRecord<String, String> record = context.getSingleConsumerRecord();
          HttpRequest request =
              HttpRequest.newBuilder(uri)
                  .timeout(Duration.ofSeconds(30))
                  .header("content-type", "application/json")
                  .header("x-api-key", "demo-key")
                  .header("x-event-id", record.topic() + "-" + record.partition() + "-" + record.offset())
                  .POST(HttpRequest.BodyPublishers.ofString(body(record), StandardCharsets.UTF_8))
                  .build();
          HttpResponse<String> response;
          try {
            response = http.send(request, HttpResponse.BodyHandlers.ofString());
          } catch (Exception e) {
            throw new RuntimeException(e); // Parallel Consumer retries the record
          }
          if (response.statusCode() / 100 != 2) {
            throw new RuntimeException("HTTP " + response.statusCode());
          }
          return new ProducerRecord<>(results, record.key(), response.body());
        });

    waitUntilCommitted(bootstrap, input, group);
    processor.closeDrainFirst(Duration.ofSeconds(30));
    System.exit(0);
  }

  private static String body(ConsumerRecord<String, String> record) {
    // the connector's request for the bench route: agent, rendered message, user identifier
    String id = record.topic() + "-" + record.partition() + "-" + record.offset();
    return "{\"agentUid\":\"agent-orders\",\"message\":\"Benchmark event "
        + id
        + "\",\"messageType\":\"user\",\"externalUserId\":\"user-"
        + (record.offset() % 500)
        + "\"}";
  }

  private static void waitUntilCommitted(String bootstrap, String topic, String group)
      throws Exception {
    Properties a = new Properties();
    a.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    try (Admin admin = Admin.create(a)) {
      Set<TopicPartition> tps =
          admin.describeTopics(List.of(topic)).allTopicNames().get().get(topic).partitions().stream()
              .map(info -> new TopicPartition(topic, info.partition()))
              .collect(Collectors.toSet());
      Map<TopicPartition, Long> ends =
          admin
              .listOffsets(
                  tps.stream()
                      .collect(
                          Collectors.toMap(
                              tp -> tp,
                              tp -> org.apache.kafka.clients.admin.OffsetSpec.latest())))
              .all()
              .get()
              .entrySet()
              .stream()
              .collect(Collectors.toMap(Map.Entry::getKey, e -> e.getValue().offset()));
      while (true) {
        Map<TopicPartition, OffsetAndMetadata> committed =
            admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata().get();
        boolean done =
            tps.stream()
                .allMatch(
                    tp -> committed.get(tp) != null && committed.get(tp).offset() >= ends.get(tp));
        if (done) {
          return;
        }
        Thread.sleep(200);
      }
    }
  }
}
