// Package nacosserver is an in-process stand-in for a Nacos 2.x server, built
// so that the unmodified github.com/nacos-group/nacos-sdk-go/v2 (v2.3.5)
// naming client can be tested against it. It speaks the Nacos 2.x gRPC
// protocol using the SDK's own generated stubs (api/grpc) and JSON structs
// (common/remote/rpc/rpc_request, rpc_response, model); no Java server is
// needed.
//
// # What it implements
//
// Transport (com.alibaba.nacos.core.remote.grpc.* in the Nacos server):
//   - gRPC on GRPCAddr(), which is always Addr()'s port + 1000: the SDK dials
//     ServerConfig.Port + constant.RpcPortOffset (grpc_client.go).
//   - Unary /Request/request and bidirectional /BiRequestStream/requestBiStream.
//     Messages are Payload{Metadata{type, clientIp, headers}, Any{value: JSON}}
//     with an empty type URL, as GrpcUtils.convert writes them.
//   - A connection id per transport (TCP connection), "<millis>_<ip>_<port>" as
//     in Nacos' GrpcServer transport filter; ServerCheckRequest returns it and the
//     bi-stream opened on the same transport is bound to it by
//     ConnectionSetupRequest (GrpcBiStreamRequestAcceptor).
//   - Request handling in the order of GrpcRequestAcceptor: ServerCheckRequest
//     is answered before anything else; an unknown type gets
//     ErrorResponse{errorCode 302 NO_HANDLER}; a request on a transport that has
//     not sent ConnectionSetupRequest (or whose stream has ended) gets
//     ErrorResponse{301 UN_REGISTER}, which makes the SDK reconnect; a body that
//     does not parse gets ErrorResponse{502 BAD_GATEWAY}; handler failures get
//     ErrorResponse{resultCode 500, errorCode from the NacosException}.
//
// Requests: ServerCheckRequest, HealthCheckRequest, ConnectionSetupRequest (on
// the stream), InstanceRequest (registerInstance, deregisterInstance),
// BatchInstanceRequest (batchRegisterInstance), SubscribeServiceRequest
// (subscribe and unsubscribe), ServiceQueryRequest and ServiceListRequest.
// Everything else (config requests included) gets NO_HANDLER.
//
// Server pushes on the stream: NotifySubscriberRequest (acknowledged by the
// SDK with NotifySubscriberResponse; an unacknowledged push is retried),
// ClientDetectionRequest and ConnectResetRequest (see DetectClients and
// SendConnectReset).
//
// Naming model (com.alibaba.nacos.naming.core.v2):
//   - A service is namespace + group + name, taken exactly as sent (the SDK
//     itself fills in "public" and "DEFAULT_GROUP"); the cluster is an
//     attribute of each instance ("DEFAULT" when empty).
//   - Every connection is a Nacos "client" (ConnectionBasedClient) that holds at
//     most ONE publication per service (AbstractClient.publishers is a map
//     Service -> InstancePublishInfo): registerInstance replaces whatever that
//     connection published for the service before, batchRegisterInstance
//     replaces it with a list, and deregisterInstance removes it whatever
//     ip/port it names. Deregistering from another connection is a no-op that
//     still answers success.
//   - Instances are ephemeral and die with their connection: when the stream
//     ends (transport closed, Stop, DropConnections, a client that closes) the
//     connection is unregistered and its instances and subscriptions go, and
//     subscribers get a push.
//   - Stored instances are rebuilt as InstanceUtil.parseToApiInstance does:
//     instanceId "ip#port#cluster#group@@service" when the client sent none,
//     clusterName "DEFAULT" when empty, serviceName "group@@service",
//     ephemeral true, and weight/enabled/healthy/metadata exactly as sent (the
//     Go SDK sends its zero values: weight 0, enabled false, healthy false,
//     unless the caller sets them).
//   - Pushes, like PushExecuteTask + PushExecutorRpcImpl: a change schedules a
//     push of the whole service after the push delay (Nacos'
//     nacos.naming.push.pushTaskDelay, 500 ms by default, see SetPushDelay);
//     changes inside the delay are merged. Pushed ServiceInfo leaves out
//     disabled instances (enableOnly) but keeps unhealthy ones, and carries a
//     strictly increasing lastRefTime (the SDK drops anything not newer than
//     what it holds). A subscription also schedules a push to the new
//     subscriber alone (ServiceSubscribedEvent).
//   - The subscribe response is the service's cached data (ServiceStorage.getData:
//     disabled instances included, lastRefTime of when it was computed), which
//     is refreshed whenever a push is computed; ServiceQueryRequest filters
//     cluster/healthyOnly/enabled (ServiceQueryRequestHandler).
//   - ServiceListRequest lists the services of a namespace whose group equals
//     the requested group, sorted, paged as ServiceUtil.pageServiceName does.
//     A service exists once something was registered or injected in it; there
//     is no empty-service cleaner.
//   - Validation as in the Nacos server: clusterName must match ^[0-9a-zA-Z-]+$
//     and the preserved heart-beat metadata must be consistent
//     (NamingUtils.checkInstanceIsLegal). Empty IPs and port 0 are accepted.
//
// Not implemented: the HTTP API (the Addr() port only answers 501, which is
// what the SDK reaches for persistent instances, i.e. Ephemeral=false),
// persistent instances, authentication, TLS, config service, clustering, the
// protect threshold and selectors (no service metadata exists), health checks
// of instances, the idle-connection ejector (call DetectClients), fuzzy watch.
//
// # API
//
// Start(t) listens on 127.0.0.1 and cleans up (waiting for every goroutine it
// started) when the test ends. Configure the SDK with
// constant.ServerConfig{IpAddr: s.Host(), Port: s.Port()} (Addr); GRPCAddr is
// where it actually connects. Inspect with Instances, Subscribers,
// ConnectionCount and ConnectionIDs; write as a foreign writer with Inject and
// RemoveInjected; tune the push merge window with SetPushDelay.
//
// # Faults
//
// Pause freezes the server like a SIGSTOP: unary calls, health checks and
// stream traffic hang until Resume (the SDK times out and starts
// reconnecting; its new connections hang too). Stop closes the listeners and
// every connection; ephemeral data dies with the connections, injected
// (foreign) instances survive. Start reopens the same ports; Restart(wipe)
// does both, dropping the injected data too when wipe is set. DropConnections
// closes every client transport as a server crash would, but keeps
// listening; DropConnection does it for one connection (a crashed client).
// SendConnectReset and DetectClients send the server-initiated requests.
//
// # Notes for SDK users (nacos-sdk-go v2.3.5)
//
//   - Set Ephemeral: true on RegisterInstanceParam AND DeregisterInstanceParam:
//     with false the SDK uses the HTTP API (here: 501; on a real server: a
//     different, persistent instance).
//   - Set Enable, Healthy and Weight: the SDK sends false/false/0 otherwise,
//     Nacos stores exactly that and drops disabled instances from pushes.
//   - One RegisterInstance per service per client: the next one replaces it.
//   - Every Select*/GetService call subscribes the service (and then reads
//     the SDK's cache, refreshed by pushes).
package nacosserver
