package nacosserver

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	pb "github.com/nacos-group/nacos-sdk-go/v2/api/grpc"
	"github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc/rpc_request"
	"github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc/rpc_response"
	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// Error codes of com.alibaba.nacos.api.exception.NacosException.
const (
	codeInvalidParam = 400
	codeServerError  = 500
	codeBadGateway   = 502
	codeUnregister   = 301 // UN_REGISTER: the SDK reconnects when it sees it
	codeNoHandler    = 302
)

// nacosError is a NacosException (or NacosRuntimeException) thrown by a
// handler; GrpcRequestAcceptor turns it into ErrorResponse.build(e).
type nacosError struct {
	code int
	msg  string
}

func (e *nacosError) Error() string { return fmt.Sprintf("%d: %s", e.code, e.msg) }

func success() *rpc_response.Response {
	return &rpc_response.Response{ResultCode: 200, Success: true}
}

// errorResponse is ErrorResponse.build: resultCode 500 (ResponseCode.FAIL),
// errorCode from the exception.
func errorResponse(code int, msg string) rpc_response.IResponse {
	return &rpc_response.ErrorResponse{Response: &rpc_response.Response{ResultCode: 500, ErrorCode: code, Message: msg}}
}

// responsePayload is GrpcUtils.convert(Response): the type is the response's
// simple class name, the body its JSON. (The SDK's Response.GetBody would
// only encode the embedded base fields, so the whole struct is marshalled.)
func responsePayload(resp rpc_response.IResponse) (*pb.Payload, error) {
	body, err := json.Marshal(resp)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode %s: %v", resp.GetResponseType(), err)
	}
	return &pb.Payload{
		Metadata: &pb.Metadata{Type: resp.GetResponseType(), ClientIp: "127.0.0.1"},
		Body:     &anypb.Any{Value: body},
	}, nil
}

type handlerFunc func(s *Server, c *client, body []byte) (rpc_response.IResponse, error)

// handlers is the RequestHandlerRegistry of this server.
var handlers = map[string]handlerFunc{
	"HealthCheckRequest":      handleHealthCheck,
	"InstanceRequest":         handleInstance,
	"BatchInstanceRequest":    handleBatchInstance,
	"SubscribeServiceRequest": handleSubscribe,
	"ServiceQueryRequest":     handleServiceQuery,
	"ServiceListRequest":      handleServiceList,
}

type unaryService struct {
	pb.UnimplementedRequestServer
	s *Server
	r *runState
}

// Request is GrpcRequestAcceptor#request.
func (u *unaryService) Request(ctx context.Context, p *pb.Payload) (*pb.Payload, error) {
	s := u.s
	if err := s.gate(ctx, u.r); err != nil {
		return nil, status.Error(codes.Unavailable, "server is stopping")
	}
	ci := connInfoFrom(ctx)
	typ := p.GetMetadata().GetType()
	body := p.GetBody().GetValue()
	var reqID struct {
		RequestID string `json:"requestId"`
	}
	_ = json.Unmarshal(body, &reqID)

	var resp rpc_response.IResponse
	switch h, ok := handlers[typ]; {
	case typ == "ServerCheckRequest": // answered before any other check
		resp = &rpc_response.ServerCheckResponse{Response: success(), ConnectionId: ci.id}
	case !ok:
		resp = errorResponse(codeNoHandler, "RequestHandler Not Found")
	default:
		s.mu.Lock()
		c := s.conns[ci.id]
		s.mu.Unlock()
		if c == nil {
			resp = errorResponse(codeUnregister, "Connection is unregistered.")
			break
		}
		var err error
		resp, err = h(s, c, body)
		if err != nil {
			if ne, isNacos := err.(*nacosError); isNacos {
				resp = errorResponse(ne.code, ne.msg)
			} else {
				resp = errorResponse(codeServerError, err.Error())
			}
		}
	}
	resp.SetRequestId(reqID.RequestID)
	s.logf("%s %s from %s -> %s %s", typ, body, ci.id, resp.GetResponseType(), resp.GetMessage())
	return responsePayload(resp)
}

type streamService struct {
	pb.UnimplementedBiRequestStreamServer
	s *Server
	r *runState
}

// RequestBiStream is GrpcBiStreamRequestAcceptor#requestBiStream: a
// ConnectionSetupRequest registers the connection, responses acknowledge the
// server's requests. The connection is unregistered when the stream ends.
func (b *streamService) RequestBiStream(stream pb.BiRequestStream_RequestBiStreamServer) error {
	s, r := b.s, b.r
	ctx := stream.Context()
	ci := connInfoFrom(ctx)
	var c *client
	defer func() {
		if c != nil {
			s.endStream(r, c)
		}
	}()
	for {
		p, err := stream.Recv()
		if err != nil {
			return nil
		}
		if s.gate(ctx, r) != nil {
			return nil
		}
		typ := p.GetMetadata().GetType()
		switch {
		case typ == "ConnectionSetupRequest":
			var req rpc_request.ConnectionSetupRequest
			if err := json.Unmarshal(p.GetBody().GetValue(), &req); err != nil {
				s.logf("bad ConnectionSetupRequest from %s: %v", ci.id, err)
				continue
			}
			if c != nil {
				continue // already set up
			}
			c = s.register(r, ci, p.GetMetadata().GetClientIp(), &req, stream)
		case strings.HasSuffix(typ, "Response"):
			if c != nil {
				s.ack(c, p)
			}
		default:
			s.logf("unknown payload %s on the stream of %s", typ, ci.id)
		}
	}
}

func (s *Server) register(r *runState, ci *connInfo, clientIP string, req *rpc_request.ConnectionSetupRequest, stream pb.BiRequestStream_RequestBiStreamServer) *client {
	c := &client{
		id:         ci.id,
		remote:     ci.remote,
		run:        r,
		clientIP:   clientIP,
		version:    req.ClientVersion,
		tenant:     req.Tenant,
		labels:     req.Labels,
		published:  make(map[svcKey][]model.Instance),
		subscribed: make(map[svcKey]struct{}),
		acks:       make(map[string]*pendingAck),
		out:        newOutbox(),
		done:       make(chan struct{}),
		senderDone: make(chan struct{}),
	}
	s.mu.Lock()
	if old := s.conns[c.id]; old != nil {
		s.unregisterLocked(old) // a second stream on one transport replaces the first
	}
	s.conns[c.id] = c
	s.mu.Unlock()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		s.sendLoop(r, c, stream)
	}()
	s.logf("connection %s registered (%s, labels %v)", c.id, c.version, c.labels)
	return c
}

// endStream unregisters the connection of a stream that ended. A frozen
// server notices only once it is resumed (or stopped).
func (s *Server) endStream(r *runState, c *client) {
	_ = s.gate(context.Background(), r)
	s.mu.Lock()
	s.unregisterLocked(c)
	s.mu.Unlock()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-c.senderDone:
	case <-t.C: // the writer is stuck on a live transport: cut it
		r.glis.closeConns(func(remote string) bool { return remote == c.remote })
		<-c.senderDone
	}
}

// checkedLocked verifies that c is still registered; a request that raced
// with the end of its stream fails as in checkClientIsLegal.
func (s *Server) checkedLocked(c *client) error {
	if s.conns[c.id] != c {
		return &nacosError{code: codeServerError,
			msg: fmt.Sprintf("Client [%s] connection already disconnect, can't register ephemeral instance.", c.id)}
	}
	return nil
}

// groupedName checks the names as NamingUtils#getGroupedName does (the
// handlers call it through Service#getGroupedServiceName).
func groupedName(k svcKey) error {
	if strings.TrimSpace(k.name) == "" {
		return &nacosError{code: codeServerError, msg: "Param 'serviceName' is illegal, serviceName is blank"}
	}
	if strings.TrimSpace(k.group) == "" {
		return &nacosError{code: codeServerError, msg: "Param 'groupName' is illegal, groupName is blank"}
	}
	return nil
}

func badGateway(err error) error { return &nacosError{code: codeBadGateway, msg: err.Error()} }

func namingKey(r *rpc_request.NamingRequest) svcKey {
	if r == nil {
		return svcKey{}
	}
	return svcKey{ns: r.Namespace, group: r.GroupName, name: r.ServiceName}
}

func handleHealthCheck(*Server, *client, []byte) (rpc_response.IResponse, error) {
	return &rpc_response.HealthCheckResponse{Response: success()}, nil
}

// handleInstance is InstanceRequestHandler.
func handleInstance(s *Server, c *client, body []byte) (rpc_response.IResponse, error) {
	var req rpc_request.InstanceRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, badGateway(err)
	}
	k := namingKey(req.NamingRequest)
	if err := groupedName(k); err != nil {
		return nil, err
	}
	inst := req.Instance
	setInstanceIDIfEmpty(&inst, k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkedLocked(c); err != nil {
		return nil, err
	}
	switch req.Type {
	case "registerInstance":
		if err := checkInstanceIsLegal(inst); err != nil {
			return nil, err
		}
		s.publishLocked(c, k, []model.Instance{publishInfo(inst, k)})
	case "deregisterInstance":
		s.unpublishLocked(c, k)
	default:
		return nil, &nacosError{code: codeInvalidParam, msg: "Unsupported request type " + req.Type}
	}
	return &rpc_response.InstanceResponse{Response: success()}, nil
}

// handleBatchInstance is BatchInstanceRequestHandler.
func handleBatchInstance(s *Server, c *client, body []byte) (rpc_response.IResponse, error) {
	var req rpc_request.BatchInstanceRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, badGateway(err)
	}
	k := namingKey(req.NamingRequest)
	if err := groupedName(k); err != nil {
		return nil, err
	}
	if req.Type != "batchRegisterInstance" {
		return nil, &nacosError{code: codeInvalidParam, msg: "Unsupported request type " + req.Type}
	}
	insts := make([]model.Instance, 0, len(req.Instances))
	for _, inst := range req.Instances {
		setInstanceIDIfEmpty(&inst, k)
		insts = append(insts, publishInfo(inst, k))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkedLocked(c); err != nil {
		return nil, err
	}
	s.publishLocked(c, k, insts)
	return &rpc_response.BatchInstanceResponse{Response: success()}, nil
}

// handleSubscribe is SubscribeServiceRequestHandler: the answer is the cached
// service data, unfiltered (filtered by cluster only if the request names
// clusters, which the Go SDK never does).
func handleSubscribe(s *Server, c *client, body []byte) (rpc_response.IResponse, error) {
	var req rpc_request.SubscribeServiceRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, badGateway(err)
	}
	k := namingKey(req.NamingRequest)
	if err := groupedName(k); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkedLocked(c); err != nil {
		return nil, err
	}
	info := s.getDataLocked(k)
	if strings.TrimSpace(req.Clusters) != "" {
		info = selectInstances(info, req.Clusters, false, false)
	}
	if req.Subscribe {
		s.subscribeLocked(c, k)
	} else {
		s.unsubscribeLocked(c, k)
	}
	resp := &rpc_response.SubscribeServiceResponse{Response: success(), ServiceInfo: info}
	resp.Message = "success"
	return resp, nil
}

// handleServiceQuery is ServiceQueryRequestHandler: cached data filtered by
// cluster, health if asked, and enabled.
func handleServiceQuery(s *Server, _ *client, body []byte) (rpc_response.IResponse, error) {
	var req rpc_request.ServiceQueryRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, badGateway(err)
	}
	k := namingKey(req.NamingRequest)
	s.mu.Lock()
	defer s.mu.Unlock()
	info := selectInstances(s.getDataLocked(k), req.Cluster, req.HealthyOnly, true)
	return &rpc_response.QueryServiceResponse{Response: success(), ServiceInfo: info}, nil
}

// handleServiceList is ServiceListRequestHandler: the services of the
// namespace whose group is exactly the requested one, paged by
// ServiceUtil#pageServiceName (so pageSize 0 yields no names, but the count).
func handleServiceList(s *Server, _ *client, body []byte) (rpc_response.IResponse, error) {
	var req rpc_request.ServiceListRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, badGateway(err)
	}
	k := namingKey(req.NamingRequest)
	s.mu.Lock()
	var names []string
	for sk := range s.services {
		if sk.ns == k.ns && sk.group == k.group {
			names = append(names, sk.name)
		}
	}
	s.mu.Unlock()
	slices.Sort(names)
	page := []string{}
	start := max((req.PageNo-1)*req.PageSize, 0)
	if start < len(names) {
		end := min(start+req.PageSize, len(names))
		if end > start {
			page = names[start:end]
		}
	}
	return &rpc_response.ServiceListResponse{Response: success(), Count: len(names), ServiceNames: page}, nil
}
